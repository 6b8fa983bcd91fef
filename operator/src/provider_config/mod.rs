//! ProviderConfigs: which cloud serves which objects ([`select`], pure), the providers built
//! from them ([`registry`]), how a spec becomes a provider ([`build`]), and the status each
//! configuration reports ([`status`]).

pub mod build;
pub mod registry;
pub mod select;
pub mod status;
