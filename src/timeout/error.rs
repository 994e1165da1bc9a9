use crate::classify::FailureKind;
use std::fmt;
use std::time::Duration;

/// A call ran out of time: an attempt's timeout fired, or the request's deadline passed.
///
/// A service under a timeout must have an error type that is `From<Elapsed>`;
/// [`tower::BoxError`] and [`RpcError`](crate::rpc::RpcError) both are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Elapsed {
    // Two words: errors are moved through every future of a stack.
    /// The attempt timeout in nanoseconds, or `u64::MAX` for a passed deadline.
    attempt_nanos: u64,
    context: Option<Box<str>>,
}

/// Which limit ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElapsedKind {
    /// One attempt took longer than its timeout (another attempt may succeed in time).
    Attempt(Duration),
    /// The request's deadline passed: no more time for anything.
    Deadline,
}

impl Elapsed {
    /// An attempt timed out after `after`.
    pub fn attempt(after: Duration) -> Self {
        Elapsed {
            attempt_nanos: u64::try_from(after.as_nanos()).unwrap_or(u64::MAX - 1),
            context: None,
        }
    }

    /// The request's deadline passed.
    pub fn deadline() -> Self {
        Elapsed {
            attempt_nanos: u64::MAX,
            context: None,
        }
    }

    /// Adds what was going on (retry uses this to name the last error it saw).
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into().into_boxed_str());
        self
    }

    /// Which limit ran out.
    pub fn kind(&self) -> ElapsedKind {
        match self.attempt_nanos {
            u64::MAX => ElapsedKind::Deadline,
            nanos => ElapsedKind::Attempt(Duration::from_nanos(nanos)),
        }
    }

    /// Whether the request's deadline (not just one attempt's timeout) ran out.
    pub fn is_deadline(&self) -> bool {
        self.attempt_nanos == u64::MAX
    }

    /// The context added by [`with_context`](Self::with_context).
    pub fn context(&self) -> Option<&str> {
        self.context.as_deref()
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            ElapsedKind::Attempt(after) => write!(f, "attempt timed out after {after:?}")?,
            ElapsedKind::Deadline => f.write_str("deadline exceeded")?,
        }
        if let Some(context) = &self.context {
            write!(f, " ({context})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Elapsed {}

impl FailureKind for Elapsed {
    /// An attempt timeout is worth another attempt; a passed deadline is not.
    fn is_transient(&self) -> bool {
        !self.is_deadline()
    }
}
