//! The hot replica I/O path (`cairn_proto::frame`): blocking TCP, one
//! thread per connection on the replica's side, a small pool of idle
//! connections per peer on the engine's side. The replica checks
//! everything in a request before acting (magic, version, cluster, volume,
//! sizes, payload crc32) and answers every request, errors included; a
//! connection that breaks the framing is closed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::frame::{self, Reply, Request};

use super::host::HostMap;
use super::remote::IO_TIMEOUT;
use super::ReplicaError;
use crate::cluster::store::ClusterStore;
use crate::pool::IO_ALIGN;
use crate::sys::AlignedBuf;
use crate::types::{Id128, MAX_VOLUME_SIZE};

/// Idle connections kept per peer.
const POOL: usize = 32;
/// A connection that sends nothing for this long (idle, or stalled inside
/// a frame) is closed; an engine replaces a pooled connection the peer
/// closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Data connections served at once (each is a thread); engines keep at
/// most [`POOL`] idle ones per peer, so this leaves room for 30 peers.
pub const MAX_CONNECTIONS: usize = 1024;
/// Payload buffer a connection keeps between requests; a larger one is
/// released after the request that needed it.
const KEEP_BUFFER: usize = 1 << 20;

// ---- replica side -----------------------------------------------------------

pub struct FastServer {
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

impl FastServer {
    /// Serves one connection until the peer closes it, breaks framing or
    /// stays silent for [`IDLE_TIMEOUT`]; refused (closed at once) while
    /// [`MAX_CONNECTIONS`] are served.
    pub fn serve(&self, mut s: TcpStream) {
        let Some(_slot) = self.hosts.data_connection() else {
            tracing::warn!(
                peer = ?s.peer_addr().ok(),
                "refused a data connection: {MAX_CONNECTIONS} are open"
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
            let inbound = if req.op == frame::OP_WRITE {
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
            frame::OP_WRITE => {
                if crc32fast::hash(payload) != req.crc {
                    return Err((
                        frame::CORRUPT,
                        0,
                        "write payload failed its checksum".into(),
                    ));
                }
                h.write(req.epoch, req.offset, payload).map_err(fail)?;
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
            frame::OP_FLUSH => h.flush(req.epoch).map(|_| Vec::new()).map_err(fail),
            frame::OP_ZERO => h
                .zero_range(req.epoch, req.offset, req.length)
                .map(|_| Vec::new())
                .map_err(fail),
            other => Err(invalid(format!("unknown op {other}"))),
        }
    }
}

// ---- engine side ------------------------------------------------------------

/// Idle connections to one peer.
pub struct FastPool {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
}

impl FastPool {
    fn connect(&self) -> Result<TcpStream, ReplicaError> {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
            .map_err(|e| ReplicaError::Remote(format!("connect {}: {e}", self.addr)))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
        Ok(s)
    }

    /// One request/reply exchange; the connection returns to the pool only
    /// after a complete, well-formed reply. An idle connection the peer
    /// closed meanwhile (it restarted) is replaced once by a new one: every
    /// request is idempotent (a write of the same bytes, a read, a flush).
    pub fn call(&self, req: &Request, payload: &[u8]) -> Result<Vec<u8>, ReplicaError> {
        self.begin(req, payload)?.finish()
    }

    /// Sends a request and returns without waiting for the reply, so the
    /// caller can do other work (its local write, the other replicas'
    /// sends) before [`Pending::finish`].
    pub fn begin(&self, req: &Request, payload: &[u8]) -> Result<Pending<'_>, ReplicaError> {
        let mut out = Vec::with_capacity(frame::REQ_LEN + payload.len());
        out.extend_from_slice(&req.encode());
        out.extend_from_slice(payload);
        let idle = self.idle.lock().expect("pool lock").pop();
        let (stream, pooled) = match idle {
            Some(mut s) => match s.write_all(&out) {
                Ok(()) => (s, true),
                // A slow peer is not a closed connection: no second wait.
                Err(e) if timed_out(&e) => return Err(self.io_err(e)),
                Err(_) => (self.send_fresh(&out)?, false),
            },
            None => (self.send_fresh(&out)?, false),
        };
        Ok(Pending {
            pool: self,
            stream,
            pooled,
            out,
            epoch: req.epoch,
            volume: Id128(req.volume),
        })
    }

    fn send_fresh(&self, out: &[u8]) -> Result<TcpStream, ReplicaError> {
        let mut s = self.connect()?;
        s.write_all(out).map_err(|e| self.io_err(e))?;
        Ok(s)
    }

    fn io_err(&self, e: io::Error) -> ReplicaError {
        ReplicaError::Remote(format!("{}: {e}", self.addr))
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A request on the wire whose reply has not been read yet.
pub struct Pending<'a> {
    pool: &'a FastPool,
    stream: TcpStream,
    /// Taken from the idle pool (so it may have been closed by the peer).
    pooled: bool,
    /// The request as sent, for the one resend on a fresh connection.
    out: Vec<u8>,
    epoch: u64,
    volume: Id128,
}

impl Pending<'_> {
    /// Reads the reply (bounded by the connection's timeout).
    pub fn finish(self) -> Result<Vec<u8>, ReplicaError> {
        let Pending {
            pool,
            mut stream,
            pooled,
            out,
            epoch,
            volume,
        } = self;
        let mut hdr = [0u8; frame::REP_LEN];
        match stream.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if timed_out(&e) => return Err(pool.io_err(e)),
            Err(_) if pooled => {
                stream = pool.send_fresh(&out)?;
                stream.read_exact(&mut hdr).map_err(|e| pool.io_err(e))?;
            }
            Err(e) => return Err(pool.io_err(e)),
        }
        let rep = Reply::decode(&hdr)
            .ok_or_else(|| ReplicaError::Remote(format!("{}: not a data reply", pool.addr)))?;
        if rep.length as u64 > frame::MAX_PAYLOAD {
            return Err(ReplicaError::Remote(format!(
                "{}: reply too large",
                pool.addr
            )));
        }
        let mut body = vec![0u8; rep.length as usize];
        stream.read_exact(&mut body).map_err(|e| pool.io_err(e))?;
        if crc32fast::hash(&body) != rep.crc {
            return Err(ReplicaError::Corrupt(format!("reply from {}", pool.addr)));
        }
        {
            let mut idle = pool.idle.lock().expect("pool lock");
            if idle.len() < POOL {
                idle.push(stream);
            }
        }
        if rep.status == frame::OK {
            return Ok(body);
        }
        let msg = String::from_utf8_lossy(&body).into_owned();
        Err(ReplicaError::from_frame(
            rep.status, rep.fence, epoch, volume, msg,
        ))
    }
}

/// One pool per peer address, shared by all volumes.
#[derive(Default)]
pub struct FastPools {
    map: Mutex<HashMap<String, Arc<FastPool>>>,
}

impl FastPools {
    pub fn get(&self, addr: &str) -> Result<Arc<FastPool>, ReplicaError> {
        let mut m = self.map.lock().expect("pools lock");
        if let Some(p) = m.get(addr) {
            return Ok(p.clone());
        }
        let sa = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                ReplicaError::Remote(format!("peer address {addr:?} does not resolve"))
            })?;
        let p = Arc::new(FastPool {
            addr: sa,
            idle: Mutex::new(Vec::new()),
        });
        m.insert(addr.to_string(), p.clone());
        Ok(p)
    }
}
