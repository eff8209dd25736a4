//! Mutation controls: deliberate faults that prove the contract tests can fail (`make
//! test-mutants`). Built only with the `mutants` cargo feature, which release builds never
//! enable; a build with it reads `ZEROSEND_MUTANT=<name>` once, and only the named fault is on.
//! Without the feature every check is a constant `false` that the compiler removes.

/// Resolve a send when the kernel accepted it (io_uring's first completion, `sendmsg`'s
/// return), not when it released the pages.
pub const RESOLVE_AT_ACCEPTANCE: &str = "resolve_at_acceptance";
/// Report `zerocopy=False` for every send.
pub const ZEROCOPY_FALSE: &str = "zerocopy_false";
/// Ignore MSG_ZEROCOPY completion ranges that do not start at the oldest outstanding send.
pub const DROP_OUT_OF_ORDER: &str = "drop_out_of_order";
/// Release a send's buffer export when its future is cancelled (in the Python binding).
pub const EARLY_RELEASE_ON_CANCEL: &str = "early_release_on_cancel";

/// Every fault, for the runner and for checking the variable's value.
pub const ALL: [&str; 4] = [
    RESOLVE_AT_ACCEPTANCE,
    ZEROCOPY_FALSE,
    DROP_OUT_OF_ORDER,
    EARLY_RELEASE_ON_CANCEL,
];

/// True if this build has mutation controls and `ZEROSEND_MUTANT` names `fault`.
#[cfg(feature = "mutants")]
pub fn active(fault: &str) -> bool {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        let name = std::env::var("ZEROSEND_MUTANT").ok()?;
        assert!(
            ALL.contains(&name.as_str()),
            "ZEROSEND_MUTANT={name} names no fault; known: {ALL:?}"
        );
        Some(name)
    });
    chosen.as_deref() == Some(fault)
}

/// Always false: this build has no mutation controls.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub fn active(_fault: &str) -> bool {
    false
}
