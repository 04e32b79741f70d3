//! The replica's side of the framed data path: checks every field of a
//! request before acting and answers every request, errors included.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use cairn_proto::frame::{self, Reply, Request};

use super::super::host::{Admit, HostMap, MAX_DATA_CONNECTIONS};
use super::super::ReplicaError;
use super::*;
use crate::cluster::store::ClusterStore;
use crate::pool::IO_ALIGN;
use crate::sys::AlignedBuf;
use crate::types::{Id128, MAX_VOLUME_SIZE};

pub struct Server {
    pub store: Arc<ClusterStore>,
    pub hosts: Arc<HostMap>,
}

fn reply(s: &mut TcpStream, status: u32, fence: u64, payload: &[u8]) -> io::Result<()> {
    let h = Reply {
        status,
        fence,
        length: payload.len() as u32,
        crc: crc32fast::hash(payload),
    };
    let mut out = Vec::with_capacity(frame::REP_LEN + payload.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
    s.write_all(&out)
}

impl Server {
    /// Serves one connection until the peer closes it, breaks framing or
    /// stays silent for [`IDLE_TIMEOUT`]; refused (closed at once) while
    /// [`MAX_CONNECTIONS`] are served.
    pub fn serve(&self, mut s: TcpStream) {
        let Some(_slot) = self.hosts.data_connection() else {
            tracing::warn!(
                peer = ?s.peer_addr().ok(),
                "refused a data connection: {MAX_DATA_CONNECTIONS} are open"
            );
            return;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
        // Aligned, so a block-aligned write goes to the pool's O_DIRECT
        // path without a bounce copy.
        let mut payload = AlignedBuf::new(0, IO_ALIGN);
        loop {
            let mut hdr = [0u8; frame::REQ_LEN];
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let Some(req) = Request::decode(&hdr) else {
                return;
            };
            let inbound = if req.op == frame::OP_WRITE || req.op == frame::OP_REPAIR_WRITE {
                req.length
            } else {
                0
            };
            if inbound > frame::MAX_PAYLOAD {
                let _ = reply(&mut s, frame::INVALID, 0, b"payload too large");
                return;
            }
            let len = inbound as usize;
            if payload.as_slice().len() < len {
                payload = AlignedBuf::new(len.next_power_of_two(), IO_ALIGN);
            }
            let body = &mut payload.as_mut_slice()[..len];
            if s.read_exact(body).is_err() {
                return;
            }
            let r = self.handle(&req, &payload.as_slice()[..len]);
            let sent = match r {
                Ok(data) => reply(&mut s, frame::OK, 0, &data),
                Err((status, fence, msg)) => reply(&mut s, status, fence, msg.as_bytes()),
            };
            if sent.is_err() {
                return;
            }
            if payload.as_slice().len() > KEEP_BUFFER {
                payload = AlignedBuf::new(0, IO_ALIGN);
            }
        }
    }

    fn handle(&self, req: &Request, payload: &[u8]) -> Result<Vec<u8>, (u32, u64, String)> {
        let invalid = |m: String| (frame::INVALID, 0, m);
        if req.version < frame::MIN_VERSION || req.version > frame::VERSION {
            return Err((
                frame::UNSUPPORTED,
                0,
                format!(
                    "frame version {} not supported ({}..={})",
                    req.version,
                    frame::MIN_VERSION,
                    frame::VERSION
                ),
            ));
        }
        let ours = self.store.read().cluster_id;
        if Id128(req.cluster) != ours {
            return Err(invalid(format!("this node belongs to cluster {ours}")));
        }
        if req
            .offset
            .checked_add(req.length)
            .is_none_or(|e| e > MAX_VOLUME_SIZE)
        {
            return Err(invalid("range outside any volume".into()));
        }
        let volume = Id128(req.volume);
        let fail = |e: ReplicaError| {
            let (s, f) = e.frame_status();
            (s, f, e.to_string())
        };
        let h = self
            .hosts
            .get_or_create(volume, &self.store)
            .map_err(fail)?;
        match req.op {
            frame::OP_WRITE | frame::OP_REPAIR_WRITE => {
                if crc32fast::hash(payload) != req.crc {
                    return Err((
                        frame::CORRUPT,
                        0,
                        "write payload failed its checksum".into(),
                    ));
                }
                let admit = Admit::of(req.op == frame::OP_REPAIR_WRITE);
                h.write_as(admit, req.epoch, req.offset, payload)
                    .map_err(fail)?;
                Ok(Vec::new())
            }
            frame::OP_READ => {
                if req.length > frame::MAX_PAYLOAD {
                    return Err(invalid("read too large".into()));
                }
                let mut buf = vec![0u8; req.length as usize];
                h.read(req.epoch, req.offset, &mut buf).map_err(fail)?;
                Ok(buf)
            }
            frame::OP_FLUSH | frame::OP_REPAIR_FLUSH => h
                .flush_as(Admit::of(req.op == frame::OP_REPAIR_FLUSH), req.epoch)
                .map(|_| Vec::new())
                .map_err(fail),
            frame::OP_ZERO | frame::OP_REPAIR_ZERO => h
                .zero_as(
                    Admit::of(req.op == frame::OP_REPAIR_ZERO),
                    req.epoch,
                    req.offset,
                    req.length,
                )
                .map(|_| Vec::new())
                .map_err(fail),
            other => Err(invalid(format!("unknown op {other}"))),
        }
    }
}
