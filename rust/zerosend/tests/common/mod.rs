//! Helpers shared by the integration tests.

use zerosend::{Backend, Capabilities};

/// Every backend this kernel offers, copy first.
pub fn backends() -> Vec<Backend> {
    let caps = Capabilities::probe();
    let mut all = vec![Backend::Copy];
    if caps.msg_zerocopy.is_ok() {
        all.push(Backend::MsgZerocopy);
    }
    if caps.io_uring_send_zc.is_ok() {
        all.push(Backend::IoUring);
    }
    all
}
