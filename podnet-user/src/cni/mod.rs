//! The CNI plugin (spec 1.1.0; configs 0.3.0 .. 1.1.0).

pub mod config;
pub mod env;
pub mod error;
pub mod plugin;
pub mod plumbing;
pub mod result;
pub mod validate;
pub mod version;

pub use error::CniError;
