//! Errors at the HTTP edge: one type, one mapping from [`BrokerError`], and extractors
//! whose rejections use the same JSON shape as every other error.
//!
//! Codes are stable strings; a condition keeps its code forever and a code is never reused
//! for another condition. User input never produces a 5xx.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use sluice_broker::BrokerError;

use crate::api::{ErrorBody, ErrorDetail};

/// An error response: status, stable code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

/// The one mapping from broker errors to HTTP.
impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> ApiError {
        use StatusCode as S;
        let (status, code) = match &e {
            BrokerError::TopicNotFound(_) => (S::NOT_FOUND, "TOPIC_NOT_FOUND"),
            BrokerError::GroupNotFound(_) => (S::NOT_FOUND, "GROUP_NOT_FOUND"),
            BrokerError::TopicExists(_) => (S::CONFLICT, "TOPIC_EXISTS"),
            BrokerError::GroupExists(_) => (S::CONFLICT, "GROUP_EXISTS"),
            BrokerError::IllegalTopic(_) => (S::BAD_REQUEST, "INVALID_TOPIC_NAME"),
            BrokerError::IllegalGroup(_) => (S::BAD_REQUEST, "INVALID_GROUP_NAME"),
            BrokerError::BadRequest(_) => (S::BAD_REQUEST, "BAD_REQUEST"),
            BrokerError::IllegalMessageId(_) => (S::BAD_REQUEST, "INVALID_MESSAGE_ID"),
            BrokerError::IllegalKey(_) => (S::BAD_REQUEST, "INVALID_KEY"),
            BrokerError::MessageTypeMismatch { .. } => (S::BAD_REQUEST, "MESSAGE_TYPE_MISMATCH"),
            BrokerError::TooManyRequests(_) => (S::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS"),
            BrokerError::NotImplemented(_) => (S::NOT_IMPLEMENTED, "NOT_IMPLEMENTED"),
            BrokerError::Store(_) => (S::INTERNAL_SERVER_ERROR, "STORAGE_ERROR"),
            BrokerError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "INTERNAL"),
            // Remaining variants concern sends and receives, which the admin API does not
            // make; keep them 4xx or 5xx as the broker classifies them.
            other if other.is_client_error() => (S::BAD_REQUEST, "INVALID_ARGUMENT"),
            _ => (S::INTERNAL_SERVER_ERROR, "INTERNAL"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "admin request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "admin request rejected");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON request body: requires `Content-Type: application/json` (which also keeps
/// browsers from sending cross-site form posts), rejects unknown fields as the request types
/// declare, and answers every failure with a 4xx [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "the request body must be JSON with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        // An empty body stands for `{}`, so requests whose fields are all optional can
        // leave it out.
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Syntax | Category::Eof => {
                    ApiError::bad_request("INVALID_JSON", format!("malformed JSON: {e}"))
                }
                Category::Data | Category::Io => {
                    ApiError::bad_request("INVALID_REQUEST", format!("invalid request: {e}"))
                }
            }
        })
    }
}

fn body_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "request body exceeds {} bytes",
                crate::api::MAX_REQUEST_BODY
            ),
        )
    } else {
        ApiError::bad_request("INVALID_BODY", r.body_text())
    }
}

/// Query parameters, rejecting unknown or malformed ones with a JSON 400.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| Params(q))
            .map_err(|e: QueryRejection| ApiError::bad_request("INVALID_QUERY", e.body_text()))
    }
}

/// A path parameter, with a JSON 400 when it cannot be decoded.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|e: PathRejection| ApiError::bad_request("INVALID_PATH", e.body_text()))
    }
}
