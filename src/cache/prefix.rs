//! The prefix cache: a radix tree over token ids whose nodes may hold a [`Snapshot`] of the
//! sequence state after their tokens. A new prompt resumes from the deepest snapshot along
//! its path and computes only the rest.
//!
//! Memory is bounded by a byte budget over what the cache holds: each snapshot's DeltaNet
//! states, plus each K/V block its snapshots share, counted once however many share it. Past
//! the budget, the least recently used snapshots go first. A lookup refreshes only the
//! snapshot it returns, not the ones on the way (refreshing the whole path keeps shallow
//! snapshots alive that the deeper one makes useless). A sequence that resumed from a
//! snapshot copied its states and holds its own references to the K/V blocks, so evicting
//! never takes anything from a running sequence.

use std::collections::HashMap;
use std::sync::Arc;

use super::{KvBlock, Snapshot};

const ROOT: usize = 0;

struct Node {
    parent: usize,
    /// The tokens on the edge from the parent.
    tokens: Vec<u32>,
    /// By first token.
    children: HashMap<u32, usize>,
    entry: Option<Entry>,
}

struct Entry {
    snap: Arc<Snapshot>,
    last_used: u64,
}

/// What a lookup found.
pub struct Hit {
    /// The state after the prompt's first `snap.pos()` tokens.
    pub snap: Arc<Snapshot>,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Snapshots held now.
    pub snapshots: usize,
    /// Bytes held now (states and distinct K/V blocks).
    pub bytes: usize,
    /// Snapshots evicted so far.
    pub evictions: u64,
}

pub struct PrefixCache {
    /// Arena; node 0 is the root (no tokens, never an entry). Freed slots are reused.
    nodes: Vec<Node>,
    free: Vec<usize>,
    budget: usize,
    /// Per K/V block held by a snapshot (by address): snapshots holding it, and its bytes.
    blocks: HashMap<usize, (usize, usize)>,
    block_bytes: usize,
    state_bytes: usize,
    tick: u64,
    stats: PrefixStats,
}

fn block_key(b: &Arc<KvBlock>) -> usize {
    Arc::as_ptr(b) as usize
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes.
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            nodes: vec![Node {
                parent: ROOT,
                tokens: Vec::new(),
                children: HashMap::new(),
                entry: None,
            }],
            free: Vec::new(),
            budget,
            blocks: HashMap::new(),
            block_bytes: 0,
            state_bytes: 0,
            tick: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Evicts everything (a router's `/flush_cache`); running sequences keep what they hold
    /// through their own references. Returns the snapshots dropped.
    pub fn clear(&mut self) -> usize {
        let dropped = self.nodes.iter().filter(|n| n.entry.is_some()).count();
        let evictions = self.stats.evictions + dropped as u64;
        *self = PrefixCache::new(self.budget);
        self.stats.evictions = evictions;
        dropped
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            bytes: self.bytes(),
            snapshots: self.nodes.iter().filter(|n| n.entry.is_some()).count(),
            ..self.stats
        }
    }

    fn bytes(&self) -> usize {
        self.state_bytes + self.block_bytes
    }

    /// The deepest snapshot after a prefix of `tokens` no longer than `limit` tokens, if any.
    pub fn lookup(&mut self, tokens: &[u32], limit: usize) -> Option<Hit> {
        let (mut node, mut depth, mut best) = (ROOT, 0, None);
        while depth < tokens.len() {
            let Some(&child) = self.nodes[node].children.get(&tokens[depth]) else {
                break;
            };
            let edge = &self.nodes[child].tokens;
            if depth + edge.len() > tokens.len() || tokens[depth..depth + edge.len()] != edge[..] {
                break;
            }
            depth += edge.len();
            node = child;
            if depth > limit {
                break;
            }
            if self.nodes[node].entry.is_some() {
                best = Some(node);
            }
        }
        let node = best?;
        self.tick += 1;
        let entry = self.nodes[node]
            .entry
            .as_mut()
            .expect("chosen for its entry");
        entry.last_used = self.tick;
        Some(Hit {
            snap: entry.snap.clone(),
        })
    }

    /// Whether a snapshot after exactly `tokens` is held (it is then marked as used).
    pub fn contains(&mut self, tokens: &[u32]) -> bool {
        match self.find(tokens) {
            Some(n) if self.nodes[n].entry.is_some() => {
                self.tick += 1;
                let tick = self.tick;
                if let Some(e) = self.nodes[n].entry.as_mut() {
                    e.last_used = tick;
                }
                true
            }
            _ => false,
        }
    }

    /// The node ending exactly after `tokens`, if there is one.
    fn find(&self, tokens: &[u32]) -> Option<usize> {
        let (mut node, mut depth) = (ROOT, 0);
        while depth < tokens.len() {
            let child = *self.nodes[node].children.get(&tokens[depth])?;
            let edge = &self.nodes[child].tokens;
            if depth + edge.len() > tokens.len() || tokens[depth..depth + edge.len()] != edge[..] {
                return None;
            }
            depth += edge.len();
            node = child;
        }
        Some(node)
    }

    /// Stores `snap`, the state after `tokens` (`snap.pos() == tokens.len() > 0`), then
    /// evicts least recently used snapshots until the budget holds (the new one too, if it
    /// alone is over the budget).
    pub fn insert(&mut self, tokens: &[u32], snap: Arc<Snapshot>) {
        assert!(
            snap.pos() == tokens.len() && !tokens.is_empty(),
            "a snapshot at {} stored for {} tokens",
            snap.pos(),
            tokens.len()
        );
        let node = self.node_for(tokens);
        self.tick += 1;
        if let Some(e) = self.nodes[node].entry.as_mut() {
            e.last_used = self.tick;
            return;
        }
        self.hold(&snap, 1);
        self.nodes[node].entry = Some(Entry {
            snap,
            last_used: self.tick,
        });
        while self.bytes() > self.budget {
            if !self.evict_lru() {
                break;
            }
        }
    }

    /// Counts `snap`'s bytes in (`sign` 1) or out (`sign` −1).
    fn hold(&mut self, snap: &Snapshot, sign: isize) {
        if sign > 0 {
            self.state_bytes += snap.state_bytes();
        } else {
            self.state_bytes -= snap.state_bytes();
        }
        for b in snap.kv_blocks().iter().flatten() {
            let key = block_key(b);
            if sign > 0 {
                let e = self.blocks.entry(key).or_insert((0, b.bytes_held()));
                if e.0 == 0 {
                    self.block_bytes += e.1;
                }
                e.0 += 1;
            } else if let Some(e) = self.blocks.get_mut(&key) {
                e.0 -= 1;
                if e.0 == 0 {
                    self.block_bytes -= e.1;
                    self.blocks.remove(&key);
                }
            }
        }
    }

    /// Evicts the least recently used snapshot; false when none is left.
    fn evict_lru(&mut self) -> bool {
        let victim = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.entry.as_ref().map(|e| (e.last_used, i)))
            .min();
        let Some((_, node)) = victim else {
            return false;
        };
        let entry = self.nodes[node].entry.take().expect("chosen for its entry");
        self.hold(&entry.snap, -1);
        self.stats.evictions += 1;
        self.prune(node);
        true
    }

    /// Removes `node` and its ancestors while they hold nothing and lead nowhere.
    fn prune(&mut self, mut node: usize) {
        while node != ROOT
            && self.nodes[node].entry.is_none()
            && self.nodes[node].children.is_empty()
        {
            let parent = self.nodes[node].parent;
            let first = self.nodes[node].tokens[0];
            self.nodes[parent].children.remove(&first);
            self.nodes[node].tokens = Vec::new();
            self.free.push(node);
            node = parent;
        }
    }

    fn alloc(&mut self, parent: usize, tokens: Vec<u32>) -> usize {
        let n = Node {
            parent,
            tokens,
            children: HashMap::new(),
            entry: None,
        };
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = n;
                i
            }
            None => {
                self.nodes.push(n);
                self.nodes.len() - 1
            }
        }
    }

    /// The node ending exactly after `tokens`, made by adding a leaf or splitting an edge.
    fn node_for(&mut self, tokens: &[u32]) -> usize {
        let (mut node, mut depth) = (ROOT, 0);
        while depth < tokens.len() {
            let Some(&child) = self.nodes[node].children.get(&tokens[depth]) else {
                let leaf = self.alloc(node, tokens[depth..].to_vec());
                self.nodes[node].children.insert(tokens[depth], leaf);
                return leaf;
            };
            let edge = &self.nodes[child].tokens;
            let common = edge
                .iter()
                .zip(&tokens[depth..])
                .take_while(|(a, b)| a == b)
                .count();
            if common < edge.len() {
                // Split the edge: a new node for its first `common` tokens above `child`.
                let head = edge[..common].to_vec();
                let tail_first = edge[common];
                let mid = self.alloc(node, head);
                self.nodes[node].children.insert(tokens[depth], mid);
                self.nodes[child].tokens.drain(..common);
                self.nodes[child].parent = mid;
                self.nodes[mid].children.insert(tail_first, child);
                node = mid;
                depth += common;
            } else {
                node = child;
                depth += common;
            }
        }
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::blocks::{KvDtype, PagedKv, BLOCK};

    /// A snapshot at `pos` with one DeltaNet layer of `state` floats and one attention
    /// layer whose K/V blocks are `kv`'s first `pos` rows.
    fn snap(pos: usize, state: usize, kv: &PagedKv) -> Arc<Snapshot> {
        let mut k = kv.clone();
        k.truncate(pos.min(kv.len()));
        Arc::new(Snapshot {
            pos,
            linear: vec![(vec![0.0; 1], vec![pos as f32; state - 1])],
            kv: vec![k.blocks().to_vec()],
            mtp: None,
        })
    }

    fn kv(rows: usize) -> PagedKv {
        let mut kv = PagedKv::new(KvDtype::F32, 1, 2);
        for i in 0..rows {
            kv.push(&[i as f32; 2], &[0.0; 2]);
        }
        kv
    }

    fn block_bytes() -> usize {
        KvBlock::bytes(KvDtype::F32, 2)
    }

    #[test]
    fn lookup_finds_the_deepest_snapshot_within_the_limit() {
        let mut c = PrefixCache::new(usize::MAX);
        let none = kv(0);
        let t: Vec<u32> = (0..20).collect();
        c.insert(&t[..5], snap(5, 4, &none));
        c.insert(&t[..12], snap(12, 4, &none));
        // A branch after 8 tokens splits the edge 5..12.
        let mut other = t[..8].to_vec();
        other.extend([100, 101]);
        c.insert(&other, snap(10, 4, &none));
        assert_eq!(c.lookup(&t, 20).map(|h| h.snap.pos()), Some(12));
        assert_eq!(c.lookup(&t, 11).map(|h| h.snap.pos()), Some(5));
        assert_eq!(c.lookup(&t[..11], 20).map(|h| h.snap.pos()), Some(5));
        let mut probe = other.clone();
        probe.push(7);
        assert_eq!(c.lookup(&probe, 20).map(|h| h.snap.pos()), Some(10));
        assert_eq!(c.lookup(&[50, 1, 2], 20).map(|h| h.snap.pos()), None);
        assert!(c.contains(&t[..12]) && c.contains(&other) && !c.contains(&t[..8]));
        assert_eq!(c.stats().snapshots, 3);
    }

    #[test]
    fn eviction_goes_by_last_use_and_counts_shared_blocks_once() {
        let rows = kv(3 * BLOCK);
        let t: Vec<u32> = (0..(3 * BLOCK) as u32).collect();
        let state = 100;
        let one = 4 * state;
        // Room for three snapshots' states and all three blocks.
        let mut c = PrefixCache::new(3 * one + 3 * block_bytes());
        c.insert(&t[..BLOCK], snap(BLOCK, state, &rows));
        c.insert(&t[..BLOCK + 1], snap(BLOCK + 1, state, &rows));
        assert_eq!(c.stats().bytes, 2 * one + 2 * block_bytes());
        c.insert(&t[..2 * BLOCK + 1], snap(2 * BLOCK + 1, state, &rows));
        assert_eq!(c.stats().bytes, 3 * one + 3 * block_bytes());
        // The oldest is used again, so the next insert evicts the second instead.
        assert!(c.lookup(&t[..BLOCK + 1], BLOCK).is_some());
        let held = c.lookup(&t, 2 * BLOCK + 1).expect("deepest").snap;
        c.insert(&t[..5], snap(5, state, &rows));
        let s = c.stats();
        assert_eq!((s.snapshots, s.evictions), (3, 1));
        assert!(!c.contains(&t[..BLOCK + 1]));
        assert!(c.contains(&t[..BLOCK]) && c.contains(&t[..5]));
        // A tiny budget evicts everything, and what a holder took stays whole.
        let mut tiny = PrefixCache::new(one - 1);
        tiny.insert(&t[..3], snap(3, state, &rows));
        assert_eq!(tiny.stats().snapshots, 0);
        assert_eq!(tiny.stats().bytes, 0);
        assert_eq!(
            tiny.nodes.len() - tiny.free.len(),
            1,
            "pruned back to the root"
        );
        c = PrefixCache::new(0);
        drop(c);
        assert_eq!(held.kv_blocks()[0].len(), 3);
        assert_eq!(held.linear[0].1[0], (2 * BLOCK + 1) as f32);
    }

    #[test]
    fn splitting_and_pruning_keep_the_tree_consistent() {
        let mut c = PrefixCache::new(3 * 4 * 4);
        let none = kv(0);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
        let b: Vec<u32> = vec![1, 2, 3, 9, 9];
        let d: Vec<u32> = vec![1, 2];
        c.insert(&a, snap(6, 4, &none));
        c.insert(&b, snap(5, 4, &none));
        c.insert(&d, snap(2, 4, &none));
        assert_eq!(c.lookup(&b, 10).map(|h| h.snap.pos()), Some(5));
        // Budget for three: a fourth evicts the least recent (a), and a's leaf is pruned.
        let e: Vec<u32> = vec![7];
        c.insert(&e, snap(1, 4, &none));
        assert!(!c.contains(&a));
        assert!(c.find(&a).is_none());
        assert_eq!(c.lookup(&a, 10).map(|h| h.snap.pos()), Some(2));
        assert_eq!(c.lookup(&[7, 1], 10).map(|h| h.snap.pos()), Some(1));
        // Freed nodes are reused.
        let before = c.nodes.len();
        c.insert(&[1, 2, 3, 4, 5, 6, 7, 8], snap(8, 4, &none));
        assert!(c.nodes.len() <= before + 1);
        assert!(c.contains(&[1, 2, 3, 4, 5, 6, 7, 8]));
    }
}
