//! Mutation controls: deliberate faults that prove the contract tests can fail (`make
//! test-mutants`). Built only with the `mutants` cargo feature, which release builds never
//! enable; a build with it reads `ZEROSEND_MUTANT=<name>` once, and only the named fault is on.
//! Without the feature every check is a constant `false` that the compiler removes. Faults that
//! live in Python read the chosen name through the extension's `_mutant()` (mutants builds
//! only; `zerosend._mutant`), so a release build has none either.
//!
//! The places where a release, an order or a truth is decided, and the fault of each:
//!
//! Core (this crate)
//! - io_uring / MSG_ZEROCOPY completion: a send resolves at the release notification, not at
//!   acceptance ([`RESOLVE_AT_ACCEPTANCE`]).
//! - the copied/zero-copy verdict of a result ([`ZEROCOPY_FALSE`]).
//! - MSG_ZEROCOPY completion ranges, which may come out of order ([`DROP_OUT_OF_ORDER`]).
//!
//! Binding (`zerosend-py`)
//! - a cancelled future never releases its buffer exports ([`EARLY_RELEASE_ON_CANCEL`]).
//! - a failed send's future gets its exception, not a result ([`ERROR_AS_RESULT`]).
//! - a `SendResult` object is shared only between equal outcomes ([`STALE_RESULT`]), and so is
//!   the awaitable of a send that finished inside its call ([`STALE_COMPLETED`]).
//! - the buffers of a list/tuple go out in list order ([`VECTORED_REVERSED`]).
//! - a pool buffer goes back to its pool only once released and no export of it (an in-flight
//!   send, a view) is left ([`POOL_BUFFER_BACK_WHILE_EXPORTED`]).
//!
//! Stream writer (`zerosend/_streams.py`)
//! - a write counts in the write buffer (`drain()`'s back-pressure) until its release
//!   ([`STREAM_UNRELEASED_UNCOUNTED`]).
//! - a failed send is the stream's error, raised by the next write or drain
//!   ([`STREAM_ERROR_DROPPED`]).
//! - a `write_zc` future resolves with the kernel's release of the send
//!   ([`STREAM_RESOLVES_AT_SUBMIT`]).
//!
//! Fallback (`zerosend/_fallback.py`)
//! - a send resolves once the kernel took all of its bytes ([`FALLBACK_SHORT_SEND_RESOLVES`]).
//! - sends queued on a stream go out in call order ([`FALLBACK_BATCH_REORDERED`]).
//! - every result says `zerocopy=False` ([`FALLBACK_CLAIMS_ZEROCOPY`]).
//! - after a stream send fails, every send queued behind it fails
//!   ([`FALLBACK_STREAM_SURVIVES_FAILURE`]).
//!
//! iSCSI target (`zerosend/iscsi`)
//! - a pooled transmit buffer is leased to one holder at a time (`bufpool`)
//!   ([`BUFPOOL_LEASE_SHARED`]).
//! - memory a `mem:` LUN lent to a send is copied before a WRITE changes it (`stores` loans)
//!   ([`LOAN_WRITTEN_IN_PLACE`]).
//! - a mapped image lends its pages to sends only when nothing can write them (`stores`)
//!   ([`MAPPED_WRITABLE_LENT`]).
//! - an image's write marks its span dirty, so that a flush covering it syncs (`stores`)
//!   ([`WRITE_NOT_MARKED_DIRTY`]).
//! - a flush waits for the syncs under way that cover its range (`stores.flush`)
//!   ([`FLUSH_IGNORES_SYNCS_UNDER_WAY`]).
//! - a sync that failed leaves its span dirty, for the next flush to sync again
//!   (`stores.flush`) ([`FAILED_SYNC_FORGETS_DIRTY`]).

/// Resolve a send when the kernel accepted it (io_uring's first completion, `sendmsg`'s
/// return), not when it released the pages.
pub const RESOLVE_AT_ACCEPTANCE: &str = "resolve_at_acceptance";
/// Report `zerocopy=False` for every send.
pub const ZEROCOPY_FALSE: &str = "zerocopy_false";
/// Ignore MSG_ZEROCOPY completion ranges that do not start at the oldest outstanding send.
pub const DROP_OUT_OF_ORDER: &str = "drop_out_of_order";
/// Release a send's buffer export when its future is cancelled (in the Python binding).
pub const EARLY_RELEASE_ON_CANCEL: &str = "early_release_on_cancel";
/// Resolve a failed send's future with a result of 0 bytes instead of its exception (binding).
pub const ERROR_AS_RESULT: &str = "error_as_result";
/// Give a send's future the last `SendResult` made, whatever its own outcome (binding).
pub const STALE_RESULT: &str = "stale_result";
/// Give a send that finished inside its call the last such send's awaitable, whatever its own
/// outcome (binding).
pub const STALE_COMPLETED: &str = "stale_completed";
/// Send the buffers of a list/tuple in reverse order (binding).
pub const VECTORED_REVERSED: &str = "vectored_reversed";
/// Hand a released pool buffer back to its pool while a send or a view still exports it
/// (binding).
pub const POOL_BUFFER_BACK_WHILE_EXPORTED: &str = "pool_buffer_back_while_exported";
/// Leave the stream writer's writes out of its write buffer: `drain()` never waits (Python).
pub const STREAM_UNRELEASED_UNCOUNTED: &str = "stream_unreleased_uncounted";
/// Drop a failed send's error instead of making it the stream's error (Python).
pub const STREAM_ERROR_DROPPED: &str = "stream_error_dropped";
/// Resolve the stream writer's `write_zc` future when the send is submitted, before the kernel
/// released it (Python).
pub const STREAM_RESOLVES_AT_SUBMIT: &str = "stream_resolves_at_submit";
/// The fallback resolves a stream send when the kernel took part of it, and drops the rest.
pub const FALLBACK_SHORT_SEND_RESOLVES: &str = "fallback_short_send_resolves";
/// The fallback writes the sends queued on a stream in reverse order.
pub const FALLBACK_BATCH_REORDERED: &str = "fallback_batch_reordered";
/// The fallback reports `zerocopy=True` for its copies.
pub const FALLBACK_CLAIMS_ZEROCOPY: &str = "fallback_claims_zerocopy";
/// The fallback fails only the stream send that failed; the ones queued behind it still go.
pub const FALLBACK_STREAM_SURVIVES_FAILURE: &str = "fallback_stream_survives_failure";
/// The iSCSI buffer pool leases a free buffer without taking it off the free list: the next
/// lease gets the same memory.
pub const BUFPOOL_LEASE_SHARED: &str = "bufpool_lease_shared";
/// A `mem:` LUN's WRITE changes memory lent to a send in place (no copy-on-write).
pub const LOAN_WRITTEN_IN_PLACE: &str = "loan_written_in_place";
/// A writable mapped image (`PATH:mmap`) lends its pages to READs' sends.
pub const MAPPED_WRITABLE_LENT: &str = "mapped_writable_lent";
/// A flush with nothing dirty in its range answers at once, without waiting for the syncs under
/// way in other threads.
pub const FLUSH_IGNORES_SYNCS_UNDER_WAY: &str = "flush_ignores_syncs_under_way";
/// An image's write leaves the dirty span alone: a flush then finds nothing to sync.
pub const WRITE_NOT_MARKED_DIRTY: &str = "write_not_marked_dirty";
/// A failed sync forgets the span it was to make durable: the next flush answers at once.
pub const FAILED_SYNC_FORGETS_DIRTY: &str = "failed_sync_forgets_dirty";

/// Every fault, for the runner and for checking the variable's value.
pub const ALL: [&str; 22] = [
    RESOLVE_AT_ACCEPTANCE,
    ZEROCOPY_FALSE,
    DROP_OUT_OF_ORDER,
    EARLY_RELEASE_ON_CANCEL,
    ERROR_AS_RESULT,
    STALE_RESULT,
    STALE_COMPLETED,
    VECTORED_REVERSED,
    POOL_BUFFER_BACK_WHILE_EXPORTED,
    STREAM_UNRELEASED_UNCOUNTED,
    STREAM_ERROR_DROPPED,
    STREAM_RESOLVES_AT_SUBMIT,
    FALLBACK_SHORT_SEND_RESOLVES,
    FALLBACK_BATCH_REORDERED,
    FALLBACK_CLAIMS_ZEROCOPY,
    FALLBACK_STREAM_SURVIVES_FAILURE,
    BUFPOOL_LEASE_SHARED,
    LOAN_WRITTEN_IN_PLACE,
    MAPPED_WRITABLE_LENT,
    WRITE_NOT_MARKED_DIRTY,
    FLUSH_IGNORES_SYNCS_UNDER_WAY,
    FAILED_SYNC_FORGETS_DIRTY,
];

/// The fault `ZEROSEND_MUTANT` names, in a build with mutation controls (checked against
/// [`ALL`] once).
#[cfg(feature = "mutants")]
pub fn chosen() -> Option<&'static str> {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Option<&'static str>> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let name = std::env::var("ZEROSEND_MUTANT").ok()?;
        let known = ALL.iter().find(|fault| **fault == name);
        assert!(
            known.is_some(),
            "ZEROSEND_MUTANT={name} names no fault; known: {ALL:?}"
        );
        known.copied()
    })
}

/// True if this build has mutation controls and `ZEROSEND_MUTANT` names `fault`.
#[cfg(feature = "mutants")]
pub fn active(fault: &str) -> bool {
    chosen() == Some(fault)
}

/// Always false: this build has no mutation controls.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub fn active(_fault: &str) -> bool {
    false
}
