//! Recognising palisade's and tower's errors inside a `dyn Error` (for `tower::BoxError` stacks).

use crate::classify::FailureKind;
use std::error::Error;

/// Returns the [`FailureKind`] view of `error` if it is one of the error types palisade knows.
pub(crate) fn as_failure_kind<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a dyn FailureKind> {
    if let Some(e) = error.downcast_ref::<crate::circuit_breaker::CircuitOpen>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<crate::timeout::Elapsed>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<crate::rpc::RpcError>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<crate::fault::InjectedFault>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<std::io::Error>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<tower::timeout::error::Elapsed>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<tower::load_shed::error::Overloaded>() {
        return Some(e);
    }
    if let Some(e) = error.downcast_ref::<tower::buffer::error::Closed>() {
        return Some(e);
    }
    None
}
