use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// A JSON value kept as its text: payloads travel from the caller's `Serialize` to the handler's
/// `Deserialize` without being parsed in between (a transport only copies the bytes into its frame).
///
/// Cheap to clone (reference-counted bytes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawJson(Bytes);

impl RawJson {
    /// `null`.
    pub fn null() -> Self {
        RawJson(Bytes::from_static(b"null"))
    }

    /// Serialises `value`.
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(RawJson(Bytes::from(serde_json::to_vec(value)?)))
    }

    /// Validates `text` as JSON.
    pub fn from_text(text: impl Into<Bytes>) -> Result<Self, serde_json::Error> {
        let bytes = text.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)?;
        Ok(RawJson(bytes))
    }

    /// Bytes already known to hold one valid JSON value (cut out of a parsed frame).
    #[cfg(any(feature = "tcp", feature = "nats"))]
    pub(crate) fn from_trusted(bytes: Bytes) -> Self {
        RawJson(bytes)
    }

    /// Deserialises into `T`; on failure the error names the path of the offending field.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let mut deserializer = serde_json::Deserializer::from_slice(&self.0);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|error| DecodeError {
            path: error.path().to_string(),
            message: error.inner().to_string(),
        })
    }

    /// Parses into a [`serde_json::Value`].
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        // The bytes came from serde_json (UTF-8) or were validated as JSON, which is UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("null")
    }

    /// The JSON text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether the value is `null`.
    pub fn is_null(&self) -> bool {
        self.0.as_ref() == b"null"
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON value that did not decode into the expected type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    path: String,
    message: String,
}

impl DecodeError {
    /// Where in the value decoding failed (`.` for the value itself, `user.address.zip`, `items[2]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What went wrong (serde's message).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "field `{}`: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DecodeError {}
