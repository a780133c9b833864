//! Where an instance's state is kept: one redb database (`state.redb` in the instance's directory under /run/pfwd).
//! A database rather than one JSON file because a change writes what it changes: `pfwd add` writes one rule, its
//! duplicate key and the small [`Meta`], not every rule, and reads a rule by id or by key without reading the others,
//! so it costs the same with 10 or 100,000 rules. Each write is one transaction, committed durably: a crash leaves
//! the state before or after it, never a mix.
//!
//! Tables: `meta` (the [`Meta`] as JSON), `rules` (id → [`StoredRule`] as JSON, so ids come out in order) and
//! `keys` (pairs of a hash of a rule's duplicate key and the rule's id; a hit is checked against the rule).
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::rules::Rule;
use crate::state::{Meta, StoredRule};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RULES: TableDefinition<u32, &[u8]> = TableDefinition::new("rules");
/// (hash of the duplicate key, id) → nothing: a plain table of pairs, cheaper to fill than a multimap.
const KEYS: TableDefinition<(u64, u32), ()> = TableDefinition::new("keys");

/// What one write changes besides the meta: rules removed and added or, with `replace`, every rule (those added are
/// then all there are).
#[derive(Default)]
pub struct Write<'a> {
    pub removed: &'a [StoredRule],
    pub added: &'a [StoredRule],
    pub replace: bool,
}

pub struct Store {
    db: Database,
}

/// A stored rule: its slot and the rule, as JSON without `StoredRule`'s flattening (serde's `flatten` buffers every
/// field of every rule on the way in).
#[derive(serde::Serialize)]
struct Stored<'a> {
    slot: u32,
    rule: &'a Rule,
}

#[derive(serde::Deserialize)]
struct Loaded {
    slot: u32,
    rule: Rule,
}

/// Rules added by a write are encoded this many at a time.
const CHUNK: usize = 256;

/// Rules encoded for the `rules` table (JSON, back to back in `bytes`) with their `keys` hashes: (id, start, end,
/// [`dedup_hash`]) each.
struct Encoded {
    bytes: Vec<u8>,
    items: Vec<(u32, usize, usize, u64)>,
}

fn encode_chunk(rules: &[StoredRule]) -> Result<Encoded> {
    let mut enc = Encoded { bytes: Vec::with_capacity(rules.len() * 256), items: Vec::with_capacity(rules.len()) };
    for r in rules {
        let start = enc.bytes.len();
        serde_json::to_writer(&mut enc.bytes, &Stored { slot: r.slot, rule: &r.rule })?;
        enc.items.push((r.rule.id, start, enc.bytes.len(), dedup_hash(&r.rule)?));
    }
    Ok(enc)
}

fn decode(id: u32, bytes: &[u8]) -> Result<StoredRule> {
    let Loaded { slot, rule } =
        serde_json::from_slice(bytes).with_context(|| format!("stored rule {id} is corrupt"))?;
    Ok(StoredRule { rule, slot })
}

/// A 64-bit FNV-1a hash of a rule's duplicate key ([`Rule::dedup_key`]), the store's index of rules by what they
/// match and do: 8 bytes a rule where the key itself takes about 200, and stable across Rust releases (std's hasher
/// is not). Two rules with the same hash only cost a comparison.
fn dedup_hash(r: &Rule) -> Result<u64> {
    // The JSON is hashed as it is written, not collected first: the same bytes, so the same hash.
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    serde_json::to_writer(&mut h, &r.dedup_key())?;
    Ok(h.0)
}

/// 64-bit FNV-1a over the bytes written to it.
struct Fnv(u64);

impl std::io::Write for Fnv {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = buf.iter().fold(self.0, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The form of the `keys` table's hashes ([`dedup_hash`] of [`Rule::dedup_key`]), kept in `meta` as `key_format`.
/// A store written by a pfwd whose duplicate keys had another form (1: before IPv6, without the family) gets its
/// keys rebuilt when opened, so duplicates are still found after an upgrade.
const KEY_FORMAT: &[u8] = b"2";

/// Whether `path` is a database file whose creation was killed before it was whole. redb sizes the new file and
/// writes its header, and writes the header's magic number last: a file that is not empty but starts with zeros
/// where the magic goes was never committed to (redb would refuse it as "not a redb database"), so it holds nothing
/// and may be created again. Any other content is left alone, and redb judges it.
fn creation_was_interrupted(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    // redb's magic number is 9 bytes long.
    let mut magic = Vec::with_capacity(9);
    file.by_ref().take(9).read_to_end(&mut magic).with_context(|| format!("reading {}", path.display()))?;
    Ok(!magic.is_empty() && magic.iter().all(|b| *b == 0))
}

/// A table opened for reading, or None when it was never written (every other error is one).
fn existing<T>(opened: Result<T, redb::TableError>) -> Result<Option<T>> {
    match opened {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e).context("reading pfwd's state"),
    }
}

impl Store {
    /// Opens the database at `path`, creating it when missing, or again when its creation was interrupted.
    pub fn open(path: &Path) -> Result<Store> {
        if creation_was_interrupted(path)? {
            log::warn!("{}: its creation was interrupted (it holds nothing yet); creating it again", path.display());
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        let db = Database::create(path).with_context(|| format!("opening {}", path.display()))?;
        let store = Store { db };
        store.rebuild_keys_if_old()?;
        Ok(store)
    }

    /// Rebuilds the `keys` table when it was written in another [`KEY_FORMAT`] (a store without rules has nothing to
    /// rebuild; its first write records the format).
    fn rebuild_keys_if_old(&self) -> Result<()> {
        {
            let tx = self.db.begin_read()?;
            let format = match existing(tx.open_table(META))? {
                Some(m) => m.get("key_format")?.map(|v| v.value().to_vec()),
                None => return Ok(()),
            };
            if format.as_deref() == Some(KEY_FORMAT) || existing(tx.open_table(RULES))?.is_none() {
                return Ok(());
            }
        }
        let tx = self.db.begin_write()?;
        {
            tx.delete_table(KEYS)?;
            let rules = tx.open_table(RULES)?;
            let mut keys = tx.open_table(KEYS)?;
            for item in rules.iter()? {
                let (id, v) = item?;
                let r = decode(id.value(), v.value())?;
                keys.insert((dedup_hash(&r.rule)?, r.rule.id), ())?;
            }
            tx.open_table(META)?.insert("key_format", KEY_FORMAT)?;
        }
        tx.commit().context("rebuilding pfwd's duplicate keys")?;
        Ok(())
    }

    /// The meta, or None in a database that was never written.
    pub fn meta(&self) -> Result<Option<Meta>> {
        let tx = self.db.begin_read()?;
        let Some(table) = existing(tx.open_table(META))? else { return Ok(None) };
        match table.get("state")? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).context("the state's meta is corrupt")?)),
            None => Ok(None),
        }
    }

    /// Every rule, in id order.
    pub fn rules(&self) -> Result<Vec<StoredRule>> {
        let tx = self.db.begin_read()?;
        let Some(table) = existing(tx.open_table(RULES))? else { return Ok(vec![]) };
        let mut out = Vec::with_capacity(table.len()? as usize);
        for item in table.iter()? {
            let (id, v) = item?;
            out.push(decode(id.value(), v.value())?);
        }
        Ok(out)
    }

    /// The rule with id `id`.
    pub fn rule(&self, id: u32) -> Result<Option<StoredRule>> {
        let tx = self.db.begin_read()?;
        let Some(table) = existing(tx.open_table(RULES))? else { return Ok(None) };
        match table.get(id)? {
            Some(v) => Ok(Some(decode(id, v.value())?)),
            None => Ok(None),
        }
    }

    /// The ids of the rules in `lo..=hi`, ascending.
    pub fn ids_in(&self, lo: u32, hi: u32) -> Result<Vec<u32>> {
        if lo > hi {
            return Ok(vec![]);
        }
        let tx = self.db.begin_read()?;
        let Some(table) = existing(tx.open_table(RULES))? else { return Ok(vec![]) };
        let mut out = vec![];
        for item in table.range(lo..=hi)? {
            out.push(item?.0.value());
        }
        Ok(out)
    }

    /// How many rules there are, and the lowest and highest id (for error messages).
    pub fn id_span(&self) -> Result<(u64, Option<(u32, u32)>)> {
        let tx = self.db.begin_read()?;
        let Some(table) = existing(tx.open_table(RULES))? else { return Ok((0, None)) };
        let first = table.first()?.map(|(k, _)| k.value());
        let last = table.last()?.map(|(k, _)| k.value());
        Ok((table.len()?, first.zip(last)))
    }

    /// The id of a rule with the same match and target as `r`.
    pub fn duplicate_of(&self, r: &Rule) -> Result<Option<u32>> {
        let tx = self.db.begin_read()?;
        let (Some(keys), Some(rules)) = (existing(tx.open_table(KEYS))?, existing(tx.open_table(RULES))?) else {
            return Ok(None);
        };
        let key = r.dedup_key();
        let hash = dedup_hash(r)?;
        for item in keys.range((hash, 0)..=(hash, u32::MAX))? {
            let id = item?.0.value().1;
            if let Some(v) = rules.get(id)? {
                let stored = decode(id, v.value())?;
                if stored.rule.dedup_key() == key {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    /// Writes `meta` and `w` in one transaction.
    pub fn write(&self, meta: &Meta, w: &Write) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        // A killed pfwd leaves the file as of the last commit; this keeps reopening it quick.
        tx.set_quick_repair(true);
        {
            if w.replace {
                tx.delete_table(RULES)?;
                tx.delete_table(KEYS)?;
            }
            let mut metas = tx.open_table(META)?;
            metas.insert("state", serde_json::to_vec(meta)?.as_slice())?;
            metas.insert("key_format", KEY_FORMAT)?;
            let mut rules = tx.open_table(RULES)?;
            let mut keys = tx.open_table(KEYS)?;
            for r in w.removed {
                rules.remove(r.rule.id)?;
                keys.remove((dedup_hash(&r.rule)?, r.rule.id))?;
            }
            // In key order: a B-tree fills fastest that way (10,000 rules at attach).
            let mut added: Vec<(u64, u32)> = Vec::with_capacity(w.added.len());
            let mut insert = |enc: Encoded| -> Result<()> {
                for &(id, start, end, hash) in &enc.items {
                    rules.insert(id, &enc.bytes[start..end])?;
                    added.push((hash, id));
                }
                Ok(())
            };
            if w.added.len() >= 2 * CHUNK {
                // Encoding and hashing (JSON) are about as much work as redb's inserts: a second thread does
                // them a few chunks ahead of this one, which inserts in order.
                std::thread::scope(|s| -> Result<()> {
                    let (tx, rx) = std::sync::mpsc::sync_channel(4);
                    s.spawn(move || {
                        for chunk in w.added.chunks(CHUNK) {
                            // Stops when this thread is gone (it failed on an earlier chunk).
                            if tx.send(encode_chunk(chunk)).is_err() {
                                break;
                            }
                        }
                    });
                    rx.into_iter().try_for_each(|enc| insert(enc?))
                })?;
            } else {
                w.added.chunks(CHUNK).try_for_each(|chunk| insert(encode_chunk(chunk)?))?;
            }
            added.sort_unstable();
            for key in added {
                keys.insert(key, ())?;
            }
        }
        tx.commit().context("committing pfwd's state")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DataPath, State};

    /// A test's own empty directory, removed on drop (also when the test fails).
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("pfwd-store-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A database whose creation was killed after redb wrote its header but before the magic number (what a `kill -9`
    /// of `pfwd attach` left in CI) is created again; a file that is something else is refused and left as it was.
    #[test]
    fn a_database_whose_creation_was_interrupted_is_created_again() {
        let scratch = Scratch::new("interrupted");
        let path = scratch.0.join("state.redb");
        drop(Database::create(&path).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[..9].fill(0);
        fs::write(&path, &bytes).unwrap();
        let refused = Database::create(&path).expect_err("redb refuses a header without its magic number");
        assert!(refused.to_string().contains("magic number"), "{refused}");

        let store = Store::open(&path).unwrap();
        assert_eq!(store.meta().unwrap(), None);
        assert!(store.rules().unwrap().is_empty());
        drop(store);

        let other = scratch.0.join("other.redb");
        fs::write(&other, b"not a database").unwrap();
        let err = Store::open(&other).err().expect("a file that is not a database is refused");
        assert!(format!("{err:#}").contains("Not a redb database"), "{err:#}");
        assert_eq!(fs::read(&other).unwrap(), b"not a database");
    }

    /// A store whose duplicate keys were written in another form (an older pfwd's: no `key_format`, other hashes)
    /// has them rebuilt when opened, so a rule already there is still found as a duplicate.
    #[test]
    fn old_duplicate_keys_are_rebuilt_on_open() {
        let scratch = Scratch::new("keys");
        let path = scratch.0.join("state.redb");
        let masq = Rule { id: 2, ..crate::rules::tests::ok("masquerade -o eth0") };
        let stored = [StoredRule { rule: masq.clone(), slot: 12 }];
        let meta = State::new(7, DataPath::Ebpf, "test").meta;
        Store::open(&path).unwrap().write(&meta, &Write { added: &stored, ..Default::default() }).unwrap();
        // What an older pfwd left: keys of another hash, no format mark.
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.delete_table(KEYS).unwrap();
            tx.open_table(KEYS).unwrap().insert((12345, 2), ()).unwrap();
            tx.open_table(META).unwrap().remove("key_format").unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.duplicate_of(&Rule { id: 9, ..masq.clone() }).unwrap(), Some(2));
        drop(store);
    }

    /// A write of more than two chunks (encoded on a second thread) stores every rule, in order, with its key.
    #[test]
    fn big_write_reads_back() {
        let scratch = Scratch::new("big");
        let path = scratch.0.join("state.redb");
        let stored: Vec<StoredRule> = (1..=(2 * CHUNK as u32 + 7))
            .map(|i| {
                let rule = crate::rules::tests::ok(&format!("dnat -i eth0 -p tcp --dport {i} --to 10.0.2.2:80"));
                StoredRule { rule: Rule { id: i, ..rule }, slot: i + 100 }
            })
            .collect();
        let meta = State::new(7, DataPath::Ebpf, "test").meta;
        let store = Store::open(&path).unwrap();
        store.write(&meta, &Write { added: &stored, ..Default::default() }).unwrap();
        assert_eq!(store.rules().unwrap(), stored);
        for r in [&stored[0], &stored[CHUNK], &stored[stored.len() - 1]] {
            assert_eq!(store.duplicate_of(&Rule { id: 0, ..r.rule.clone() }).unwrap(), Some(r.rule.id));
        }
        drop(store);
    }
}
