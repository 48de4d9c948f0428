//! Octopus's error responses: `{"ErrorMessage": ..., "Errors": [...]}` with its exact texts where
//! octopus-api.md §4 knows them.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// 401 text [C: CS `UnauthorisedTest.cs`].
pub(crate) const UNAUTHORIZED: &str =
    "You must be logged in to perform this action. Please provide a valid API key or log in again.";

/// 403 text without the `Missing permission: X` suffix [C: ISS-9197, ISS-9333].
pub(crate) const FORBIDDEN: &str =
    "You do not have permission to perform this action. Please contact your Octopus administrator.";

/// `ErrorMessage` of a validation failure; the detail goes in `Errors`. Octopus's exact texts for
/// the expiry and purpose rules are unknown (octopus-api.md §12.1): ours are assumptions.
pub(crate) const VALIDATION: &str = "There was a problem with your request.";

/// [C: SW20] 400 text of the key routes.
pub(crate) const KEY_NOT_OWNED: &str = "This ApiKey does not belong to the specified user.";

/// Login failure text. An assumption: octopus-api.md does not quote Octopus's own.
pub(crate) const INVALID_LOGIN: &str = "Invalid username or password.";

/// An error answered in Octopus's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// 401: no, bad, expired or revoked credential, or a disabled user.
    Unauthorized,
    /// 403 with `Missing permission: <permission>`.
    MissingPermission(&'static str),
    /// 403 without a named permission (e.g. an admin creating a key for a human user).
    Forbidden,
    /// 404 `The resource '<id>' was not found.`
    NotFound(String),
    /// 400 `There was a problem with your request.` with the details in `Errors`.
    Validation(Vec<String>),
    /// 400 whose `ErrorMessage` is the given text (also repeated in `Errors`).
    BadRequest(String),
    /// Any status with just an `ErrorMessage` (405, injected faults, ...).
    Status(StatusCode, String),
}

impl ApiError {
    /// A validation error with one detail.
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Self::Validation(vec![detail.into()])
    }

    /// The status code and the JSON body.
    pub(crate) fn parts(&self) -> (StatusCode, Value) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, json!({ "ErrorMessage": UNAUTHORIZED })),
            Self::MissingPermission(permission) => (
                StatusCode::FORBIDDEN,
                json!({ "ErrorMessage": format!("{FORBIDDEN} Missing permission: {permission}") }),
            ),
            Self::Forbidden => (StatusCode::FORBIDDEN, json!({ "ErrorMessage": FORBIDDEN })),
            Self::NotFound(id) => {
                (StatusCode::NOT_FOUND, json!({ "ErrorMessage": format!("The resource '{id}' was not found.") }))
            }
            Self::Validation(details) => {
                (StatusCode::BAD_REQUEST, json!({ "ErrorMessage": VALIDATION, "Errors": details }))
            }
            Self::BadRequest(message) => {
                (StatusCode::BAD_REQUEST, json!({ "ErrorMessage": message, "Errors": [message] }))
            }
            Self::Status(status, message) => {
                // Octopus puts validation details in `Errors`; keep that shape for 400 and 409.
                let body = if matches!(*status, StatusCode::BAD_REQUEST | StatusCode::CONFLICT) {
                    json!({ "ErrorMessage": message, "Errors": [message] })
                } else {
                    json!({ "ErrorMessage": message })
                };
                (*status, body)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        let mut response = (status, Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        response
    }
}
