//! The Backend.AI coordinator API, served beside ours on the same listener:
//! what the unmodified Backend.AI Manager (`/status`, `/v2`, `/health`) and
//! App Proxy workers (`/api`, `/v1`) call. Handlers are thin translations
//! onto the store; the shapes are in [`crate::backendai::circuit`].
//! Authentication and error bodies follow upstream ([`auth`], [`error`]).

pub mod auth;
pub mod error;

pub use error::BaiError;
