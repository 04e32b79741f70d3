//! How the kernel and clients reach a volume engine: a block device of
//! this host ([`block`]: the interface, and FUSE file + loop device behind
//! it, [`fuse`]) and the NBD export ([`nbd`]).

pub mod block;
pub mod fuse;
pub mod nbd;
