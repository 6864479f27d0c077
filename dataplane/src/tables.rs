//! Forwarding tables: what the hot loops read, without locks or allocation, and the writer API
//! the control plane (or the static configuration) programs them with: per VNI the FDB
//! (MAC → VTEP), ARP answers (IPv4 → MAC), the flood list, the address blocks, and this
//! host's own endpoints (the only sources its TAP may send from).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Cache};

use crate::counters::NetworkCounters;
use crate::crypto::{NetworkKey, Sealer};
use crate::wire::{MacAddr, Vni};

/// Hash state for the tables: fast, and seeded per process so that addresses chosen by an
/// attacker cannot be aimed at one bucket.
pub type FastState = foldhash::fast::RandomState;
/// A hash map with [`FastState`].
pub type FastMap<K, V> = HashMap<K, V, FastState>;
/// A hash set with [`FastState`].
pub type FastSet<K> = HashSet<K, FastState>;

/// Why a table update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The update names a VNI that has no network on this host.
    #[error("no network with VNI {0} on this host")]
    UnknownVni(Vni),
    /// A network with this VNI already exists.
    #[error("a network with VNI {0} already exists on this host")]
    DuplicateVni(Vni),
    /// A block prefix length outside 1..=32.
    #[error("block prefix length {0} is not between 1 and 32")]
    BadPrefix(u8),
    /// FDB entries are for unicast MACs; group addresses always go to the flood list.
    #[error("{0} is a multicast or broadcast MAC; only unicast MACs can have an FDB entry")]
    GroupMac(MacAddr),
}

/// What a network is set up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Whether frames from member VTEPs teach us where their source MACs are.
    pub learning: bool,
    /// The IP MTU of the network (its TAP, bridge and containers): inner frames above it are
    /// segmented (TCP, UDP) or dropped.
    pub mtu: u32,
    /// Sealed between hosts: from its first moment it sends only sealed datagrams (none until
    /// it has a key, [`Transaction::set_crypto`]) and takes only sealed ones.
    pub encrypted: bool,
}

/// An encrypted network's keys on this host: the keys its datagrams are opened with (the
/// current epoch's and, during a rotation, the one before), and the [`Sealer`] of the one it
/// sends with (none: it has no key yet, and sends nothing). A network with this set never
/// sends or takes a plain datagram.
#[derive(Debug)]
pub struct NetworkCrypto {
    keys: Vec<NetworkKey>,
    sealer: Option<Sealer>,
}

impl NetworkCrypto {
    /// Opens with `keys`, seals with the one of epoch `send` (if among them), as `local` in
    /// `session` (a number larger than any this host sealed with before, see [`Sealer`]).
    pub fn new(keys: Vec<NetworkKey>, send: Option<u8>, local: IpAddr, session: u64) -> NetworkCrypto {
        let sealer = keys.iter().find(|k| Some(k.epoch) == send).map(|k| Sealer::new(k, local, session));
        NetworkCrypto { keys, sealer }
    }

    /// An encrypted network's state before it has a key: it opens and seals nothing.
    pub fn keyless() -> NetworkCrypto {
        NetworkCrypto { keys: Vec::new(), sealer: None }
    }

    /// The keys datagrams are opened with.
    pub fn keys(&self) -> &[NetworkKey] {
        &self.keys
    }

    /// What this host seals with, if it has the key.
    #[inline]
    pub fn sealer(&self) -> Option<&Sealer> {
        self.sealer.as_ref()
    }
}

/// Who holds an address block of a cluster network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOwner {
    /// This host: its containers answer for these addresses themselves.
    Local,
    /// The host behind this VTEP.
    Remote(IpAddr),
    /// The host behind this VTEP, confirmed down: its block stays leased, frames for it are
    /// dropped (and counted) until it is back.
    Down(IpAddr),
}

/// The tables of one overlay network (one VNI), and the TAP it is attached to: `T` is the
/// TAP's handle (`Arc<Tap>` in the Linux shell, `()` or a number in tests).
///
/// Besides exact entries, a cluster network knows where each host's address *block* is:
/// a container's MAC is derived from its IP (`02:4f` + IPv4, see [`MacAddr::from_ipv4`]), so
/// any address of a remote block resolves to that block's VTEP, with no flooding and no
/// learning. ARP is answered from the exact entries (the endpoints gossip reports); a cluster
/// network never floods an ARP request.
///
/// A cluster network also knows this host's own endpoints (MAC → IPv4 address): once they are
/// set ([`Transaction::set_local_endpoints`]), a frame from the TAP is sent only if its source
/// is one of them, and a frame from a VTEP is delivered only if its source lies in that VTEP's
/// block (see [`crate::switch`]).
///
/// And it may know the network's subnet and each host's **mesh address** (the routing mesh
/// of published ports, see [`Transaction::set_mesh`]): a frame from a host's mesh address
/// (by its derived MAC) carries a client from outside the overlay, so it may have any IPv4
/// source outside the subnet; every other frame keeps the rules above.
#[derive(Debug, Clone)]
pub struct NetworkTable<T> {
    vni: Vni,
    tap: T,
    learning: bool,
    mtu: u32,
    fdb: FastMap<MacAddr, IpAddr>,
    arp: FastMap<Ipv4Addr, MacAddr>,
    flood: Vec<IpAddr>,
    members: FastSet<IpAddr>,
    /// Block prefix length (0: no blocks) and blocks by their first address.
    block_prefix: u8,
    blocks: FastMap<u32, BlockOwner>,
    gateway: Option<Ipv4Addr>,
    /// This host's endpoints, and whether the TAP's frames are checked against them.
    local: FastMap<MacAddr, Ipv4Addr>,
    checks_sources: bool,
    /// The subnet as (address, mask), and every host's mesh address.
    subnet: Option<(u32, u32)>,
    mesh: FastSet<Ipv4Addr>,
    /// An encrypted network's keys (shared by every snapshot, so the sealer's counter goes
    /// on across table updates).
    crypto: Option<Arc<NetworkCrypto>>,
    /// What the hot loops counted for this network (shared by every snapshot, as `crypto`).
    counters: Arc<NetworkCounters>,
}

impl<T> NetworkTable<T> {
    fn new(vni: Vni, tap: T, settings: NetworkSettings) -> Self {
        NetworkTable {
            vni,
            tap,
            learning: settings.learning,
            mtu: settings.mtu,
            crypto: settings.encrypted.then(|| Arc::new(NetworkCrypto::keyless())),
            fdb: FastMap::default(),
            arp: FastMap::default(),
            flood: Vec::new(),
            members: FastSet::default(),
            block_prefix: 0,
            blocks: FastMap::default(),
            gateway: None,
            local: FastMap::default(),
            checks_sources: false,
            subnet: None,
            mesh: FastSet::default(),
            counters: Arc::default(),
        }
    }

    /// The network's VNI.
    pub fn vni(&self) -> Vni {
        self.vni
    }

    /// The TAP this network's frames come from and go to.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    /// Whether frames from member VTEPs teach us where their source MACs are.
    pub fn learning(&self) -> bool {
        self.learning
    }

    /// The network's IP MTU.
    #[inline]
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The VTEP that owns `mac`, from the control plane or static configuration.
    #[inline]
    pub fn fdb(&self, mac: &MacAddr) -> Option<IpAddr> {
        self.fdb.get(mac).copied()
    }

    /// The MAC that answers for `ip`.
    #[inline]
    pub fn arp(&self, ip: &Ipv4Addr) -> Option<MacAddr> {
        self.arp.get(ip).copied()
    }

    /// Who holds the block `ip` is in, if the network has blocks and one holds it.
    #[inline]
    pub fn block(&self, ip: Ipv4Addr) -> Option<BlockOwner> {
        if self.block_prefix == 0 {
            return None;
        }
        let mask = u32::MAX << (32 - u32::from(self.block_prefix));
        self.blocks.get(&(u32::from(ip) & mask)).copied()
    }

    /// Whether the network has address blocks (a cluster network).
    #[inline]
    pub fn has_blocks(&self) -> bool {
        self.block_prefix != 0
    }

    /// The gateway address, served by each host's own bridge.
    #[inline]
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }

    /// Whether frames from the TAP must come from one of this host's endpoints (a cluster
    /// network; a static one sends what its bridge gives it).
    #[inline]
    pub fn checks_sources(&self) -> bool {
        self.checks_sources
    }

    /// The address of this host's endpoint with `mac`.
    #[inline]
    pub fn local_endpoint(&self, mac: &MacAddr) -> Option<Ipv4Addr> {
        self.local.get(mac).copied()
    }

    /// An encrypted network's keys; `None` for a plain network.
    #[inline]
    pub fn crypto(&self) -> Option<&Arc<NetworkCrypto>> {
        self.crypto.as_ref()
    }

    /// The network's counters: the hot loops count what they handle of it here.
    #[inline]
    pub fn counters(&self) -> &NetworkCounters {
        &self.counters
    }

    /// Whether `ip` is a host's mesh address (the routing mesh's source of outside clients).
    #[inline]
    pub fn is_mesh(&self, ip: Ipv4Addr) -> bool {
        self.mesh.contains(&ip)
    }

    /// Whether `ip` lies outside the network's subnet (false while the subnet is unknown:
    /// every address is then taken for the overlay's own).
    #[inline]
    pub fn outside_subnet(&self, ip: Ipv4Addr) -> bool {
        self.subnet.is_some_and(|(addr, mask)| u32::from(ip) & mask != addr)
    }

    /// Every host's mesh address.
    pub fn mesh_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.mesh.iter().copied()
    }

    /// This host's endpoints: (MAC, address).
    pub fn local_endpoints(&self) -> impl Iterator<Item = (MacAddr, Ipv4Addr)> + '_ {
        self.local.iter().map(|(m, i)| (*m, *i))
    }

    /// Every block: (first address, prefix length, owner).
    pub fn block_entries(&self) -> impl Iterator<Item = (Ipv4Addr, u8, BlockOwner)> + '_ {
        self.blocks.iter().map(|(b, o)| (Ipv4Addr::from(*b), self.block_prefix, *o))
    }

    /// The VTEPs a broadcast, multicast or unknown-unicast frame is replicated to.
    #[inline]
    pub fn flood_list(&self) -> &[IpAddr] {
        &self.flood
    }

    /// Whether `vtep` may send frames of this network: the member VTEPs, the only senders
    /// accepted, are derived from the flood list, the FDB destinations and the remote blocks.
    #[inline]
    pub fn is_member(&self, vtep: &IpAddr) -> bool {
        self.members.contains(vtep)
    }

    /// Every FDB entry.
    pub fn fdb_entries(&self) -> impl Iterator<Item = (MacAddr, IpAddr)> + '_ {
        self.fdb.iter().map(|(m, v)| (*m, *v))
    }

    /// Every ARP entry.
    pub fn arp_entries(&self) -> impl Iterator<Item = (Ipv4Addr, MacAddr)> + '_ {
        self.arp.iter().map(|(i, m)| (*i, *m))
    }

    fn recompute_members(&mut self) {
        self.members.clear();
        self.members.extend(self.flood.iter().copied());
        self.members.extend(self.fdb.values().copied());
        self.members.extend(self.blocks.values().filter_map(|o| match o {
            BlockOwner::Remote(v) => Some(*v),
            BlockOwner::Local | BlockOwner::Down(_) => None,
        }));
    }
}

/// One immutable snapshot of every network's tables.
///
/// A network keeps its slot (its index here) for as long as it exists, so the slot a hot loop
/// got from one snapshot names the same network in the next.
#[derive(Debug)]
pub struct Tables<T> {
    networks: Vec<Option<Arc<NetworkTable<T>>>>,
    by_vni: FastMap<Vni, usize>,
    /// VTEPs known to take VXLAN remote checksum offload (overlayd agents, kernel VTEPs with
    /// `remcsumrx`), whatever the network.
    remote_checksum: Arc<FastSet<IpAddr>>,
    generation: u64,
}

impl<T> Default for Tables<T> {
    fn default() -> Self {
        Tables { networks: Vec::new(), by_vni: FastMap::default(), remote_checksum: Arc::default(), generation: 0 }
    }
}

impl<T> Clone for Tables<T> {
    fn clone(&self) -> Self {
        Tables {
            networks: self.networks.clone(),
            by_vni: self.by_vni.clone(),
            remote_checksum: Arc::clone(&self.remote_checksum),
            generation: self.generation,
        }
    }
}

impl<T> Tables<T> {
    /// The network in `slot`.
    #[inline]
    pub fn network(&self, slot: usize) -> Option<&NetworkTable<T>> {
        self.networks.get(slot)?.as_deref()
    }

    /// The network with `vni`, and its slot.
    #[inline]
    pub fn by_vni(&self, vni: Vni) -> Option<(usize, &NetworkTable<T>)> {
        let slot = *self.by_vni.get(&vni)?;
        Some((slot, self.network(slot)?))
    }

    /// Every network with its slot.
    pub fn networks(&self) -> impl Iterator<Item = (usize, &NetworkTable<T>)> {
        self.networks.iter().enumerate().filter_map(|(i, n)| Some((i, n.as_deref()?)))
    }

    /// Number of slots (some may be empty).
    pub fn slots(&self) -> usize {
        self.networks.len()
    }

    /// Counts up by one with every published change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `vtep` takes VXLAN remote checksum offload: a datagram to it may leave its
    /// inner checksum partial ([`crate::wire::vxlan::RemoteChecksum`]). Every other VTEP gets
    /// plain RFC 7348.
    #[inline]
    pub fn takes_remote_checksum(&self, vtep: &IpAddr) -> bool {
        !self.remote_checksum.is_empty() && self.remote_checksum.contains(vtep)
    }

    /// The VTEPs that take remote checksum offload.
    pub fn remote_checksum_vteps(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.remote_checksum.iter().copied()
    }
}

/// The shared, swappable tables: one writer at a time, any number of lock-free readers.
///
/// The tables are an immutable snapshot behind an [`ArcSwap`]. A reader keeps an
/// [`arc_swap::Cache`], so looking at the current snapshot costs one atomic load when nothing
/// changed. A writer opens a [`Transaction`], which copies only the networks it touches
/// (each network is its own `Arc`), and publishes all its changes at once on commit; the old
/// snapshot is freed when the last hot loop lets go of it, which is also what keeps a removed
/// network's TAP open until no loop can still be writing to it.
#[derive(Debug)]
pub struct SharedTables<T> {
    current: Arc<ArcSwap<Tables<T>>>,
    writer: Mutex<()>,
}

impl<T> Default for SharedTables<T> {
    fn default() -> Self {
        SharedTables { current: Arc::new(ArcSwap::from_pointee(Tables::default())), writer: Mutex::new(()) }
    }
}

/// A hot loop's handle on the tables: `load()` is one atomic load unless they changed.
pub type TablesReader<T> = Cache<Arc<ArcSwap<Tables<T>>>, Arc<Tables<T>>>;

impl<T: Clone> SharedTables<T> {
    /// The current snapshot (for control-side readers; hot loops use a [`TablesReader`]).
    pub fn load(&self) -> Arc<Tables<T>> {
        self.current.load_full()
    }

    /// Applies `f`'s changes and publishes them as one new snapshot. Writers are serialized;
    /// readers never wait. If `f` fails, nothing is published.
    pub fn update<R, E>(&self, f: impl FnOnce(&mut Transaction<T>) -> Result<R, E>) -> Result<R, E> {
        let _one_writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut tx = Transaction { tables: Tables::clone(&self.current.load()), touched: Vec::new(), changed: false };
        let out = f(&mut tx)?;
        if tx.touched.is_empty() && !tx.changed {
            return Ok(out);
        }
        for slot in std::mem::take(&mut tx.touched) {
            if let Some(Some(net)) = tx.tables.networks.get_mut(slot) {
                Arc::make_mut(net).recompute_members();
            }
        }
        tx.tables.generation += 1;
        self.current.store(Arc::new(tx.tables));
        Ok(out)
    }
}

impl<T> SharedTables<T> {
    /// A reader for one hot-loop thread.
    pub fn reader(&self) -> TablesReader<T> {
        Cache::new(Arc::clone(&self.current))
    }
}

/// Changes to the tables, published together when the closure given to
/// [`SharedTables::update`] returns `Ok`.
pub struct Transaction<T> {
    tables: Tables<T>,
    touched: Vec<usize>,
    /// Something beyond the touched networks changed.
    changed: bool,
}

impl<T: Clone> Transaction<T> {
    fn net(&mut self, vni: Vni) -> Result<&mut NetworkTable<T>, TableError> {
        let slot = *self.tables.by_vni.get(&vni).ok_or(TableError::UnknownVni(vni))?;
        if !self.touched.contains(&slot) {
            self.touched.push(slot);
        }
        let net = self.tables.networks[slot].as_mut().ok_or(TableError::UnknownVni(vni))?;
        Ok(Arc::make_mut(net))
    }

    /// The tables as they will be published (for reads inside the transaction).
    pub fn tables(&self) -> &Tables<T> {
        &self.tables
    }

    /// Replaces the set of VTEPs that take remote checksum offload.
    pub fn set_remote_checksum_vteps(&mut self, vteps: impl IntoIterator<Item = IpAddr>) {
        let set: FastSet<IpAddr> = vteps.into_iter().collect();
        if *self.tables.remote_checksum != set {
            self.tables.remote_checksum = Arc::new(set);
            self.changed = true;
        }
    }

    /// Adds a network attached to `tap`; returns its slot.
    pub fn add_network(&mut self, vni: Vni, tap: T, settings: NetworkSettings) -> Result<usize, TableError> {
        if self.tables.by_vni.contains_key(&vni) {
            return Err(TableError::DuplicateVni(vni));
        }
        let net = Some(Arc::new(NetworkTable::new(vni, tap, settings)));
        let slot = match self.tables.networks.iter().position(Option::is_none) {
            Some(free) => {
                self.tables.networks[free] = net;
                free
            }
            None => {
                self.tables.networks.push(net);
                self.tables.networks.len() - 1
            }
        };
        self.tables.by_vni.insert(vni, slot);
        self.touched.push(slot);
        Ok(slot)
    }

    /// Removes a network and gives its TAP back.
    pub fn remove_network(&mut self, vni: Vni) -> Result<T, TableError> {
        let slot = self.tables.by_vni.remove(&vni).ok_or(TableError::UnknownVni(vni))?;
        let net = self.tables.networks[slot].take().ok_or(TableError::UnknownVni(vni))?;
        self.touched.retain(|&s| s != slot);
        // Mark the change for publication even though no network is left to recompute.
        self.touched.push(slot);
        Ok(net.tap.clone())
    }

    /// Changes a network's IP MTU (what frames from other hosts may be coalesced up to, and
    /// what an oversized local frame is cut to).
    pub fn set_mtu(&mut self, vni: Vni, mtu: u32) -> Result<(), TableError> {
        self.net(vni)?.mtu = mtu;
        Ok(())
    }

    /// Turns data-plane learning on or off for a network.
    pub fn set_learning(&mut self, vni: Vni, on: bool) -> Result<(), TableError> {
        self.net(vni)?.learning = on;
        Ok(())
    }

    /// Replaces the flood list (duplicates are dropped, order kept).
    pub fn set_flood_list(&mut self, vni: Vni, vteps: impl IntoIterator<Item = IpAddr>) -> Result<(), TableError> {
        let net = self.net(vni)?;
        net.flood.clear();
        for v in vteps {
            if !net.flood.contains(&v) {
                net.flood.push(v);
            }
        }
        Ok(())
    }

    /// Adds one VTEP to the flood list.
    pub fn add_flood(&mut self, vni: Vni, vtep: IpAddr) -> Result<(), TableError> {
        let net = self.net(vni)?;
        if !net.flood.contains(&vtep) {
            net.flood.push(vtep);
        }
        Ok(())
    }

    /// Removes one VTEP from the flood list.
    pub fn remove_flood(&mut self, vni: Vni, vtep: IpAddr) -> Result<bool, TableError> {
        let net = self.net(vni)?;
        let before = net.flood.len();
        net.flood.retain(|v| *v != vtep);
        Ok(net.flood.len() != before)
    }

    /// Sets where a MAC lives.
    pub fn set_fdb(&mut self, vni: Vni, mac: MacAddr, vtep: IpAddr) -> Result<(), TableError> {
        if mac.is_multicast() {
            return Err(TableError::GroupMac(mac));
        }
        self.net(vni)?.fdb.insert(mac, vtep);
        Ok(())
    }

    /// Forgets where a MAC lives.
    pub fn remove_fdb(&mut self, vni: Vni, mac: MacAddr) -> Result<Option<IpAddr>, TableError> {
        Ok(self.net(vni)?.fdb.remove(&mac))
    }

    /// Sets the MAC that answers ARP requests for `ip`.
    pub fn set_arp(&mut self, vni: Vni, ip: Ipv4Addr, mac: MacAddr) -> Result<(), TableError> {
        if mac.is_multicast() {
            return Err(TableError::GroupMac(mac));
        }
        self.net(vni)?.arp.insert(ip, mac);
        Ok(())
    }

    /// Replaces every FDB and ARP entry of the network with `endpoints`: (address, MAC, VTEP)
    /// of each remote endpoint (a cluster network's endpoints, as gossip reports them).
    pub fn set_endpoints(
        &mut self,
        vni: Vni,
        endpoints: impl IntoIterator<Item = (Ipv4Addr, MacAddr, IpAddr)>,
    ) -> Result<(), TableError> {
        let net = self.net(vni)?;
        net.fdb.clear();
        net.arp.clear();
        for (ip, mac, vtep) in endpoints {
            if mac.is_multicast() {
                return Err(TableError::GroupMac(mac));
            }
            net.fdb.insert(mac, vtep);
            net.arp.insert(ip, mac);
        }
        Ok(())
    }

    /// Replaces the network's address blocks: every block has prefix length `prefix` and is
    /// named by its first address.
    pub fn set_blocks(
        &mut self,
        vni: Vni,
        prefix: u8,
        blocks: impl IntoIterator<Item = (Ipv4Addr, BlockOwner)>,
    ) -> Result<(), TableError> {
        if prefix == 0 || prefix > 32 {
            return Err(TableError::BadPrefix(prefix));
        }
        let net = self.net(vni)?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        net.block_prefix = prefix;
        net.blocks.clear();
        net.blocks.extend(blocks.into_iter().map(|(ip, o)| (u32::from(ip) & mask, o)));
        Ok(())
    }

    /// Sets the gateway address (ARP requests for it are answered by the host's own bridge,
    /// never flooded).
    pub fn set_gateway(&mut self, vni: Vni, gateway: Option<Ipv4Addr>) -> Result<(), TableError> {
        self.net(vni)?.gateway = gateway;
        Ok(())
    }

    /// Replaces this host's own endpoints of the network, (MAC, address) each, and from now on
    /// sends only frames from them (an empty list: nothing from the TAP is sent).
    pub fn set_local_endpoints(
        &mut self,
        vni: Vni,
        endpoints: impl IntoIterator<Item = (MacAddr, Ipv4Addr)>,
    ) -> Result<(), TableError> {
        let net = self.net(vni)?;
        net.local.clear();
        for (mac, ip) in endpoints {
            if mac.is_multicast() {
                return Err(TableError::GroupMac(mac));
            }
            net.local.insert(mac, ip);
        }
        net.checks_sources = true;
        Ok(())
    }

    /// Sets the network's subnet (`addr`/`prefix`) and every host's mesh address: from then on
    /// a frame whose source MAC is derived from the mesh address of the host that sends it
    /// (this host's, from the TAP; a remote host's, from its VTEP) may carry any IPv4 source
    /// outside the subnet, the address of a client the host took in on a published port.
    pub fn set_mesh(
        &mut self,
        vni: Vni,
        subnet: (Ipv4Addr, u8),
        addresses: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<(), TableError> {
        let (addr, prefix) = subnet;
        if prefix == 0 || prefix > 32 {
            return Err(TableError::BadPrefix(prefix));
        }
        let net = self.net(vni)?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        net.subnet = Some((u32::from(addr) & mask, mask));
        net.mesh.clear();
        net.mesh.extend(addresses);
        Ok(())
    }

    /// Makes the network encrypted with `crypto` (from then on it neither sends nor takes a
    /// plain datagram), or plain again with `None`.
    pub fn set_crypto(&mut self, vni: Vni, crypto: Option<Arc<NetworkCrypto>>) -> Result<(), TableError> {
        self.net(vni)?.crypto = crypto;
        Ok(())
    }

    /// Stops answering ARP requests for `ip`.
    pub fn remove_arp(&mut self, vni: Vni, ip: Ipv4Addr) -> Result<Option<MacAddr>, TableError> {
        Ok(self.net(vni)?.arp.remove(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vni(n: u32) -> Vni {
        Vni::new(n).unwrap()
    }
    fn settings(learning: bool) -> NetworkSettings {
        NetworkSettings { learning, mtu: 1450, encrypted: false }
    }
    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const M: MacAddr = MacAddr([2, 0, 0, 0, 0, 7]);

    #[test]
    fn a_transaction_publishes_once_and_members_follow() {
        let t = Arc::new(SharedTables::<u8>::default());
        let mut reader = t.reader();
        assert_eq!(reader.load().generation(), 0);
        t.update(|tx| {
            tx.add_network(vni(100), 1, settings(true))?;
            tx.set_flood_list(vni(100), [A, A])?;
            tx.set_fdb(vni(100), M, B)?;
            tx.set_arp(vni(100), Ipv4Addr::new(10, 0, 0, 7), M)
        })
        .unwrap();
        let snap = reader.load();
        assert_eq!(snap.generation(), 1);
        let (slot, net) = snap.by_vni(vni(100)).unwrap();
        assert_eq!(slot, 0);
        assert_eq!(*net.tap(), 1);
        assert_eq!(net.flood_list(), &[A]);
        assert!(net.is_member(&A) && net.is_member(&B));
        assert_eq!(net.fdb(&M), Some(B));
        assert_eq!(net.arp(&Ipv4Addr::new(10, 0, 0, 7)), Some(M));

        t.update(|tx| tx.remove_fdb(vni(100), M)).unwrap();
        let snap = reader.load();
        assert!(!snap.by_vni(vni(100)).unwrap().1.is_member(&B), "B left with its last FDB entry");
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let t = Arc::new(SharedTables::<u8>::default());
        t.update(|tx| tx.add_network(vni(1), 0, settings(false))).unwrap();
        let err = t
            .update(|tx| {
                tx.set_flood_list(vni(1), [A])?;
                tx.add_network(vni(1), 0, settings(false))
            })
            .unwrap_err();
        assert_eq!(err, TableError::DuplicateVni(vni(1)));
        assert!(t.load().by_vni(vni(1)).unwrap().1.flood_list().is_empty());
        assert_eq!(
            t.update(|tx| tx.set_fdb(vni(1), MacAddr::BROADCAST, A)),
            Err(TableError::GroupMac(MacAddr::BROADCAST))
        );
        assert_eq!(t.update(|tx| tx.set_fdb(vni(2), M, A)), Err(TableError::UnknownVni(vni(2))));
    }

    #[test]
    fn blocks_resolve_addresses_and_make_members() {
        let t = Arc::new(SharedTables::<u8>::default());
        t.update(|tx| {
            tx.add_network(vni(1), 1, settings(false))?;
            tx.set_blocks(
                vni(1),
                24,
                [
                    (Ipv4Addr::new(10, 128, 0, 0), BlockOwner::Local),
                    (Ipv4Addr::new(10, 128, 1, 7), BlockOwner::Remote(B)),
                ],
            )
        })
        .unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni(1)).unwrap().1;
        assert_eq!(net.block(Ipv4Addr::new(10, 128, 0, 9)), Some(BlockOwner::Local));
        assert_eq!(
            net.block(Ipv4Addr::new(10, 128, 1, 200)),
            Some(BlockOwner::Remote(B)),
            "keyed by the block, not the address given"
        );
        assert_eq!(net.block(Ipv4Addr::new(10, 128, 2, 1)), None);
        assert!(net.is_member(&B) && !net.is_member(&A));
        assert_eq!(t.update(|tx| tx.set_blocks(vni(1), 0, [])), Err(TableError::BadPrefix(0)));
    }

    #[test]
    fn a_networks_counters_outlive_table_updates_but_not_the_network() {
        let t = Arc::new(SharedTables::<u8>::default());
        t.update(|tx| tx.add_network(vni(1), 1, settings(false))).unwrap();
        let frames = |t: &SharedTables<u8>| t.load().by_vni(vni(1)).unwrap().1.counters().snapshot().tx_frames;
        crate::counters::bump(&t.load().by_vni(vni(1)).unwrap().1.counters().tx.frames, 3);
        t.update(|tx| tx.set_flood_list(vni(1), [A])).unwrap();
        assert_eq!(frames(&t), 3, "every snapshot shares them");
        t.update(|tx| {
            tx.remove_network(vni(1))?;
            tx.add_network(vni(1), 1, settings(false))
        })
        .unwrap();
        assert_eq!(frames(&t), 0, "a network that comes back starts from zero");
    }

    #[test]
    fn slots_are_stable_and_reused() {
        let t = Arc::new(SharedTables::<u8>::default());
        t.update(|tx| {
            tx.add_network(vni(1), 1, settings(false))?;
            tx.add_network(vni(2), 2, settings(false))
        })
        .unwrap();
        assert_eq!(t.update(|tx| tx.remove_network(vni(1))), Ok(1));
        let snap = t.load();
        assert!(snap.network(0).is_none());
        assert_eq!(snap.by_vni(vni(2)).unwrap().0, 1);
        assert_eq!(t.update(|tx| tx.add_network(vni(3), 3, settings(false))), Ok(0));
    }
}
