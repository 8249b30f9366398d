//! The functions a worker serves: each one's declaration (what jobd lists
//! and checks arguments against) and its code, async or blocking.
//!
//! Plain data, apart from the names' rules: `protocol` declares them to
//! jobd, `jobs` runs them.

use std::{future::Future, sync::Arc};

use futures::future::BoxFuture;

use super::ctx::{Ctx, JobFailure};

/// What a function returns.
pub(crate) type Outcome = Result<serde_json::Value, JobFailure>;

type AsyncBody = Arc<dyn Fn(Ctx, serde_json::Value) -> BoxFuture<'static, Outcome> + Send + Sync>;
type BlockingBody = Arc<dyn Fn(Ctx, serde_json::Value) -> Outcome + Send + Sync>;

/// The code of a function, and so how it runs and how a cancel reaches it.
#[derive(Clone)]
pub(crate) enum Body {
    /// A future on the runtime: dropped on cancel.
    Async(AsyncBody),
    /// A call on the runtime's blocking threads: told through its `Ctx`.
    Blocking(BlockingBody),
}

impl Body {
    pub(crate) fn from_async<F, Fut>(f: F) -> Self
    where
        F: Fn(Ctx, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        Self::Async(Arc::new(move |ctx, args| Box::pin(f(ctx, args))))
    }

    pub(crate) fn from_blocking<F>(f: F) -> Self
    where
        F: Fn(Ctx, serde_json::Value) -> Outcome + Send + Sync + 'static,
    {
        Self::Blocking(Arc::new(f))
    }
}

/// One function a worker serves.
#[derive(Clone)]
pub(crate) struct Function {
    pub(crate) name: String,
    pub(crate) description: String,
    /// The JSON Schema its arguments must match; jobd checks at Submit.
    pub(crate) args_schema: Option<serde_json::Value>,
    /// What it returns, in words.
    pub(crate) returns: Option<String>,
    /// True when a run lost with its worker must not run again.
    pub(crate) not_safe_to_retry: bool,
    pub(crate) body: Body,
}

/// The longest name jobd takes, for a function or a worker.
pub(crate) const MAX_NAME_LEN: usize = 128;

/// The most functions one worker may declare.
pub(crate) const MAX_FUNCTIONS: usize = 1_000;

/// The most slots one worker may declare.
pub(crate) const MAX_SLOTS: u32 = 10_000;

/// True if `name` is a name jobd takes for a function or a worker: 1 to 128
/// characters of ASCII letters, digits, `_`, `-`, `.` and `:` (jobd's own
/// rule, checked here so that a typo fails at start, not at attach).
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_jobds_rule() {
        assert!(is_valid_name("resize.v2:fast-1_x"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("has space"));
        assert!(!is_valid_name("é"));
        assert!(is_valid_name(&"a".repeat(128)));
        assert!(!is_valid_name(&"a".repeat(129)));
    }
}
