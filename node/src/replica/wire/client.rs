//! The engine's side of the framed data path: idle connections pooled per
//! peer, bounded by [`IO_TIMEOUT`], a broken pooled connection replaced once.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::frame::{self, Reply, Request};

use super::super::{ReplicaError, IO_TIMEOUT};
use super::*;
use crate::types::Id128;

/// Idle connections to one peer.
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
}

impl Pool {
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
    pool: &'a Pool,
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
pub struct Pools {
    map: Mutex<HashMap<String, Arc<Pool>>>,
}

impl Pools {
    pub fn get(&self, addr: &str) -> Result<Arc<Pool>, ReplicaError> {
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
        let p = Arc::new(Pool {
            addr: sa,
            idle: Mutex::new(Vec::new()),
        });
        m.insert(addr.to_string(), p.clone());
        Ok(p)
    }
}
