//! Limits per client address, shared by both adapters: open connections
//! (`--max-conns-per-addr`) and new HTTP sessions (`--connect-rate`,
//! `--connect-burst`).
//!
//! One address must not be able to take every connection or session an
//! instance has. An IPv6 client usually owns a whole /64, so IPv6 addresses
//! are counted by their /64 prefix. Loopback is exempt by default
//! (`--exempt-loopback`): benchmarks, and a reverse proxy on the same host,
//! bring every client through one loopback address.
//!
//! The table is bounded: an address is kept only while it has a connection
//! open or its `/connect` bucket is refilling. When the table reaches
//! [`MAX_ADDRESSES`] entries (or twice what the last sweep left), addresses
//! without a connection whose bucket has refilled are forgotten (which changes
//! nothing: a fresh bucket is full too); if more than half of the table is still
//! left, every address without a connection is forgotten (the `/connect` limit
//! is then briefly lenient rather than memory unbounded). So the table holds at
//! most max(`MAX_ADDRESSES`, twice the addresses with a connection open), and
//! sweeps cost O(1) amortised.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::core::TokenBucket;

/// Table size that triggers a sweep of idle addresses (about 100 bytes each).
pub const MAX_ADDRESSES: usize = 65_536;

/// The per-address limits (PROTOCOL.md, "Limits").
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    /// Open connections (TCP and HTTP together) per address.
    pub max_conns: usize,
    /// `POST /connect` per second per address; 0 turns that limit off.
    pub connect_rate: u32,
    /// `POST /connect` an address may send at once.
    pub connect_burst: u32,
    /// Whether 127.0.0.0/8 and ::1 escape these limits.
    pub exempt_loopback: bool,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_conns: 256,
            connect_rate: 5,
            connect_burst: 20,
            exempt_loopback: true,
        }
    }
}

/// Every client address the instance is limiting.
#[derive(Debug)]
pub struct Peers {
    limits: PeerLimits,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    peers: HashMap<IpAddr, Peer>,
    /// The size at which the next sweep happens.
    sweep_at: usize,
}

impl Table {
    fn sweep(&mut self) {
        self.peers
            .retain(|_, p| p.conns > 0 || !p.connects.is_full());
        if self.peers.len() > MAX_ADDRESSES / 2 {
            tracing::warn!(
                addresses = self.peers.len(),
                "many client addresses are opening sessions; forgetting the /connect history of those without a connection"
            );
            self.peers.retain(|_, p| p.conns > 0);
        }
        self.sweep_at = MAX_ADDRESSES.max(2 * self.peers.len());
    }
}

#[derive(Debug)]
struct Peer {
    conns: usize,
    connects: TokenBucket,
}

/// One open connection counted against its address; given back on drop.
#[derive(Debug)]
pub struct PeerPermit {
    peers: Arc<Peers>,
    /// `None` for an exempt address.
    key: Option<IpAddr>,
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut table = self.peers.lock();
        if let Some(peer) = table.peers.get_mut(&key) {
            peer.conns -= 1;
            if peer.conns == 0 && peer.connects.is_full() {
                table.peers.remove(&key);
            }
        }
    }
}

impl Peers {
    /// An empty table enforcing `limits`.
    pub fn new(limits: PeerLimits) -> Arc<Peers> {
        Arc::new(Peers {
            limits,
            table: Mutex::new(Table {
                peers: HashMap::new(),
                sweep_at: MAX_ADDRESSES,
            }),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> PeerLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table key for `ip`, or `None` if it is exempt.
    fn key(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = ip.to_canonical(); // ::ffff:a.b.c.d is a.b.c.d
        if self.limits.exempt_loopback && ip.is_loopback() {
            return None;
        }
        Some(match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        })
    }

    fn entry<'a>(&self, table: &'a mut Table, key: IpAddr) -> &'a mut Peer {
        if table.peers.len() >= table.sweep_at && !table.peers.contains_key(&key) {
            table.sweep();
        }
        table.peers.entry(key).or_insert_with(|| Peer {
            conns: 0,
            connects: TokenBucket::new(self.limits.connect_rate, self.limits.connect_burst),
        })
    }

    /// Counts one more connection from `ip`, or `None` if it has too many.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerPermit> {
        let Some(key) = self.key(ip) else {
            return Some(PeerPermit {
                peers: self.clone(),
                key: None,
            });
        };
        let mut table = self.lock();
        let peer = self.entry(&mut table, key);
        if peer.conns >= self.limits.max_conns {
            return None;
        }
        peer.conns += 1;
        Some(PeerPermit {
            peers: self.clone(),
            key: Some(key),
        })
    }

    /// Whether `ip` may open another HTTP session now (takes a token).
    pub fn may_connect(&self, ip: IpAddr) -> bool {
        let Some(key) = self.key(ip) else {
            return true;
        };
        if self.limits.connect_rate == 0 {
            return true;
        }
        let mut table = self.lock();
        self.entry(&mut table, key).connects.try_take()
    }

    /// Addresses being tracked, for `/metrics` and tests.
    pub fn tracked(&self) -> usize {
        self.lock().peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(max_conns: usize) -> Arc<Peers> {
        Peers::new(PeerLimits {
            max_conns,
            exempt_loopback: false,
            ..PeerLimits::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_are_counted_per_address_and_given_back() {
        let peers = strict(2);
        let a = peers.admit(ip("10.0.0.1")).unwrap();
        let _b = peers.admit(ip("10.0.0.1")).unwrap();
        assert!(peers.admit(ip("10.0.0.1")).is_none());
        assert!(peers.admit(ip("10.0.0.2")).is_some());
        drop(a);
        assert!(peers.admit(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn loopback_is_exempt_unless_told_otherwise() {
        let peers = Peers::new(PeerLimits {
            max_conns: 1,
            ..PeerLimits::default()
        });
        let held: Vec<_> = (0..10).map(|_| peers.admit(ip("127.0.0.1"))).collect();
        assert!(held.iter().all(Option::is_some));
        assert!((0..100).all(|_| peers.may_connect(ip("::1"))));
        assert_eq!(peers.tracked(), 0);
        let strict = strict(1);
        let _one = strict.admit(ip("127.0.0.1")).unwrap();
        assert!(strict.admit(ip("::ffff:127.0.0.1")).is_none());
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        let peers = strict(1);
        let _a = peers.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(peers.admit(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(peers.admit(ip("2001:db8:1:3::1")).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connect_rate_per_address_and_idle_entries_are_forgotten() {
        let peers = strict(256);
        assert_eq!(
            (0..25)
                .filter(|_| peers.may_connect(ip("10.0.0.1")))
                .count(),
            20
        );
        assert!(peers.may_connect(ip("10.0.0.2")));
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert!(peers.may_connect(ip("10.0.0.1")));
        assert!(!peers.may_connect(ip("10.0.0.1")));
        // A connection's permit forgets its address once the bucket is full.
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        drop(peers.admit(ip("10.0.0.1")));
        assert_eq!(
            peers.tracked(),
            1,
            "10.0.0.2 is only forgotten when room is needed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_under_many_addresses() {
        let peers = strict(1);
        let _held = peers.admit(ip("192.168.0.1")).unwrap();
        for n in 0..(3 * MAX_ADDRESSES as u32) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            peers.may_connect(a);
            assert!(peers.tracked() <= MAX_ADDRESSES);
        }
        // The address with a connection open was kept, with its count.
        assert!(peers.admit(ip("192.168.0.1")).is_none());
    }
}
