//! How the kernel and clients reach a volume engine: the FUSE file that a
//! loop device binds to ([`fuse`]) and the NBD export ([`nbd`]).

pub mod fuse;
pub mod nbd;
