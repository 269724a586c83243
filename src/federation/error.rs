//! The error a federation handler answers with: an HTTP status plus a Matrix `errcode`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

/// A Matrix error response.
#[derive(Debug, Clone)]
pub struct MatrixError {
    /// HTTP status.
    pub status: StatusCode,
    /// `errcode`, e.g. `M_FORBIDDEN`.
    pub errcode: &'static str,
    /// Human-readable `error`.
    pub message: String,
    /// Extra top-level fields (e.g. `room_version` for M_INCOMPATIBLE_ROOM_VERSION).
    pub extra: Option<(&'static str, serde_json::Value)>,
}

impl MatrixError {
    /// A new error.
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self { status, errcode, message: message.into(), extra: None }
    }
    /// 400 M_BAD_JSON
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", m)
    }
    /// 400 M_INVALID_PARAM
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m)
    }
    /// 403 M_FORBIDDEN
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m)
    }
    /// 401 M_UNAUTHORIZED
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", m)
    }
    /// 404 M_NOT_FOUND
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m)
    }
    /// 500 M_UNKNOWN, for storage failures (the sender retries).
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", m)
    }
    /// With an extra top-level field.
    pub fn with(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.extra = Some((key, value));
        self
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.errcode, self.message)
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "errcode": self.errcode, "error": self.message });
        if let Some((k, v)) = self.extra {
            body[k] = v;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for MatrixError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "storage failure while serving a request");
        MatrixError::internal("storage failure")
    }
}
