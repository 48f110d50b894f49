//! The sled-backed [`Store`]: transactions, flushing, the change feed,
//! schema versioning and backup/restore.

use std::collections::{BTreeMap, HashSet};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::model::Sandbox;

/// Version of the on-disk layout this binary writes.
pub const SCHEMA_VERSION: u32 = 2;
/// The `format` field of a backup document.
pub const BACKUP_FORMAT: &str = "sandboxd-backup";

const SCHEMA_KEY: &[u8] = b"schema_version";
const FEED_CAPACITY: usize = 4096;

/// One committed change, in commit order.
#[derive(Debug, Clone)]
pub struct Change {
    /// Strictly increasing within one process; starts above zero.
    pub seq: u64,
    pub kind: ChangeKind,
}

/// What a [`Change`] did.
#[derive(Debug, Clone)]
pub enum ChangeKind {
    /// A sandbox was created or replaced.
    Put(Arc<Sandbox>),
    /// A sandbox was removed.
    Removed(String),
    /// Everything may have changed (a restore): re-read the whole table.
    Reset,
}

/// Everything the store holds, as one JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    pub format: String,
    pub schema_version: u32,
    pub sandboxes: Vec<Sandbox>,
    /// Opaque records by collection, then key.
    pub records: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

/// Where [`Store::assign_ipv4`] may pick an address from.
#[derive(Debug, Clone)]
pub struct AddressPool {
    /// Names the pool in errors, e.g. `network sbx0 (198.18.0.0/24)`.
    pub label: String,
    /// First and last usable address, inclusive.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    /// Tried first (e.g. the address the instance has now), if free.
    pub preferred: Option<Ipv4Addr>,
    /// Never given out (the gateway, addresses leased to other instances).
    pub exclude: HashSet<Ipv4Addr>,
    /// Where the search for a free address starts, as an offset from
    /// `first` (wrapping): a random one makes two stores sharing a network
    /// unlikely to pick the same address at the same moment.
    pub start_offset: u32,
}

impl AddressPool {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        self.first <= ip && ip <= self.last && !self.exclude.contains(&ip)
    }
}

/// The state database. One per state directory, one process at a time.
pub struct Store {
    db: sled::Db,
    sandboxes: sled::Tree,
    hosts: sled::Tree,
    /// Assigned IPv4 address (text) to the sandbox name.
    addresses: sled::Tree,
    records: sled::Tree,
    meta: sled::Tree,
    dir: PathBuf,
    write: Mutex<()>,
    seq: AtomicU64,
    feed: broadcast::Sender<Change>,
    _lock: File,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn tx_err(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Storage(format!("cannot encode a record: {e}")))
}

fn decode_sandbox(key: &[u8], bytes: &[u8]) -> Result<Sandbox> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn record_key(collection: &str, key: &str) -> Result<Vec<u8>> {
    if collection.is_empty() || collection.contains('\0') || key.contains('\0') {
        return Err(Error::Invalid {
            field: "record key",
            reason: "collection and key must be non-empty and free of NUL".into(),
        });
    }
    let mut k = Vec::with_capacity(collection.len() + 1 + key.len());
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    Ok(k)
}

/// Creates `dir` (and parents) with mode 0700 if missing and tightens an
/// existing one to 0700.
fn prepare_dir(dir: &Path) -> Result<()> {
    let io =
        |what: &str, e: std::io::Error| Error::Storage(format!("{what} {}: {e}", dir.display()));
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("cannot create state directory", e))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| io("cannot read state directory", e))?;
    if !meta.is_dir() {
        return Err(Error::Storage(format!(
            "state directory {} is not a directory",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("cannot restrict state directory", e))?;
    }
    Ok(())
}

/// Takes the exclusive lock of the state directory, recording our PID in it.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Storage(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                dir.display().to_string()
            } else {
                format!("{} (pid {holder})", dir.display())
            };
            return Err(Error::Locked(who));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::Storage(format!(
                "cannot lock {}: {e}",
                path.display()
            )))
        }
    }
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(pid.as_bytes()));
    written.map_err(|e| Error::Storage(format!("cannot write {}: {e}", path.display())))?;
    Ok(file)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. Fails with
    /// [`Error::Locked`] if another process has it open.
    pub fn open(dir: &Path) -> Result<Store> {
        prepare_dir(dir)?;
        let lock = lock_dir(dir)?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .map_err(|e| {
                Error::Storage(format!(
                    "cannot open the database: {}",
                    crate::error::sled_sentence(&e)
                ))
            })?;
        let store = Store {
            sandboxes: db.open_tree("sandboxes")?,
            hosts: db.open_tree("hosts")?,
            addresses: db.open_tree("addresses")?,
            records: db.open_tree("records")?,
            meta: db.open_tree("meta")?,
            db,
            dir: dir.to_path_buf(),
            write: Mutex::new(()),
            seq: AtomicU64::new(0),
            feed: broadcast::channel(FEED_CAPACITY).0,
            _lock: lock,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn schema_version(&self) -> Result<Option<u32>> {
        let Some(v) = self.meta.get(SCHEMA_KEY)? else {
            return Ok(None);
        };
        let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| Error::Corrupt {
            key: "schema_version".into(),
            reason: format!("{} bytes", v.len()),
        })?;
        Ok(Some(u32::from_be_bytes(bytes)))
    }

    /// Brings the on-disk layout to [`SCHEMA_VERSION`], one step at a time.
    fn migrate(&self) -> Result<()> {
        let found = match self.schema_version()? {
            Some(v) => v,
            None if self.sandboxes.is_empty() && self.records.is_empty() => SCHEMA_VERSION,
            None => 0,
        };
        if found > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            });
        }
        for from in found..SCHEMA_VERSION {
            self.migrate_step(from)?;
        }
        self.meta
            .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    fn migrate_step(&self, from: u32) -> Result<()> {
        match from {
            // Version 0 had no schema key; records may lack fields that have
            // defaults now. Re-encode each one so every stored record has the
            // current shape.
            0 => {
                for item in self.sandboxes.iter() {
                    let (k, v) = item?;
                    let sb = decode_sandbox(&k, &v)?;
                    self.sandboxes.insert(k, encode(&sb)?)?;
                }
                Ok(())
            }
            // Version 2 adds the index of assigned addresses: build it from
            // the records (which hold none when written by version 1).
            1 => {
                self.addresses.clear()?;
                for item in self.sandboxes.iter() {
                    let (k, v) = item?;
                    let sb = decode_sandbox(&k, &v)?;
                    if let Some(ip) = &sb.assigned_ipv4 {
                        self.addresses.insert(ip.as_bytes(), sb.name.as_bytes())?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Subscribes to committed changes. A receiver that lags behind gets
    /// `RecvError::Lagged` and should re-read the whole table.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    /// Sequence number of the last committed change.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    fn publish(&self, kind: ChangeKind) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        // No subscriber is not an error.
        let _ = self.feed.send(Change { seq, kind });
        seq
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One sandbox by name.
    pub fn get(&self, name: &str) -> Result<Option<Sandbox>> {
        match self.sandboxes.get(name.as_bytes())? {
            Some(v) => Ok(Some(decode_sandbox(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// All sandboxes, ordered by name.
    pub fn list(&self) -> Result<Vec<Sandbox>> {
        self.sandboxes
            .iter()
            .map(|item| {
                let (k, v) = item?;
                decode_sandbox(&k, &v)
            })
            .collect()
    }

    /// Number of sandboxes.
    pub fn len(&self) -> usize {
        self.sandboxes.len()
    }

    /// True when no sandbox exists.
    pub fn is_empty(&self) -> bool {
        self.sandboxes.is_empty()
    }

    /// The sandbox that owns `host` (as domain or agent host).
    pub fn owner_of_host(&self, host: &str) -> Result<Option<String>> {
        Ok(self
            .hosts
            .get(host.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Adds a new sandbox. Fails if the name or one of its hosts is taken.
    /// Returns the change's sequence number once the write is on disk.
    pub fn insert(&self, mut sandbox: Sandbox) -> Result<u64> {
        sandbox.validate()?;
        let t = now();
        sandbox.created_at = t;
        sandbox.updated_at = t;
        let bytes = encode(&sandbox)?;
        let _guard = self.lock();
        (&self.sandboxes, &self.hosts, &self.addresses)
            .transaction(|(sandboxes, hosts, addresses)| {
                if sandboxes.get(sandbox.name.as_bytes())?.is_some() {
                    return Err(abort(Error::NameTaken(sandbox.name.clone())));
                }
                if let Some(ip) = &sandbox.assigned_ipv4 {
                    if let Some(owner) = addresses.get(ip.as_bytes())? {
                        return Err(abort(Error::AddressTaken {
                            address: ip.clone(),
                            owner: String::from_utf8_lossy(&owner).into_owned(),
                        }));
                    }
                    addresses.insert(ip.as_bytes(), sandbox.name.as_bytes())?;
                }
                for host in sandbox.hosts() {
                    if let Some(owner) = hosts.get(host.as_bytes())? {
                        return Err(abort(Error::HostTaken {
                            host,
                            owner: String::from_utf8_lossy(&owner).into_owned(),
                        }));
                    }
                }
                for host in sandbox.hosts() {
                    hosts.insert(host.as_bytes(), sandbox.name.as_bytes())?;
                }
                sandboxes.insert(sandbox.name.as_bytes(), bytes.as_slice())?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(self.publish(ChangeKind::Put(Arc::new(sandbox))))
    }

    /// Changes a sandbox with `edit`, atomically with its host index. `edit`
    /// may run more than once and must not change the name.
    pub fn update<F>(&self, name: &str, edit: F) -> Result<(Sandbox, u64)>
    where
        F: Fn(&mut Sandbox) -> Result<()>,
    {
        let (updated, seq) = self.update_if(name, |sb| edit(sb).map(|()| true))?;
        Ok((updated, seq.unwrap_or_else(|| self.seq())))
    }

    /// Like [`Store::update`], but `edit` decides in the transaction
    /// whether to write: when it returns `false` nothing is written or
    /// published. Returns the record as it now is and, when written, the
    /// sequence number of the change.
    pub fn update_if<F>(&self, name: &str, edit: F) -> Result<(Sandbox, Option<u64>)>
    where
        F: Fn(&mut Sandbox) -> Result<bool>,
    {
        let _guard = self.lock();
        let (updated, written) = (&self.sandboxes, &self.hosts, &self.addresses)
            .transaction(|(sandboxes, hosts, addresses)| {
                let Some(old) = sandboxes.get(name.as_bytes())? else {
                    return Err(abort(Error::NotFound(name.to_string())));
                };
                let old = decode_sandbox(name.as_bytes(), &old).map_err(abort)?;
                let mut new = old.clone();
                if !edit(&mut new).map_err(abort)? {
                    return Ok((old, false));
                }
                if new.name != old.name {
                    return Err(abort(Error::Invalid {
                        field: "name",
                        reason: "a sandbox cannot be renamed in place".into(),
                    }));
                }
                new.validate().map_err(abort)?;
                new.created_at = old.created_at;
                new.updated_at = now();
                let (old_hosts, new_hosts) = (old.hosts(), new.hosts());
                for host in new_hosts.iter().filter(|h| !old_hosts.contains(h)) {
                    if let Some(owner) = hosts.get(host.as_bytes())? {
                        return Err(abort(Error::HostTaken {
                            host: host.clone(),
                            owner: String::from_utf8_lossy(&owner).into_owned(),
                        }));
                    }
                    hosts.insert(host.as_bytes(), name.as_bytes())?;
                }
                for host in old_hosts.iter().filter(|h| !new_hosts.contains(h)) {
                    hosts.remove(host.as_bytes())?;
                }
                if new.assigned_ipv4 != old.assigned_ipv4 {
                    if let Some(ip) = &new.assigned_ipv4 {
                        if let Some(owner) = addresses.get(ip.as_bytes())? {
                            if owner.as_ref() != name.as_bytes() {
                                return Err(abort(Error::AddressTaken {
                                    address: ip.clone(),
                                    owner: String::from_utf8_lossy(&owner).into_owned(),
                                }));
                            }
                        }
                    }
                    if let Some(ip) = &old.assigned_ipv4 {
                        addresses.remove(ip.as_bytes())?;
                    }
                    if let Some(ip) = &new.assigned_ipv4 {
                        addresses.insert(ip.as_bytes(), name.as_bytes())?;
                    }
                }
                sandboxes.insert(name.as_bytes(), encode(&new).map_err(abort)?)?;
                Ok((new, true))
            })
            .map_err(tx_err)?;
        if !written {
            return Ok((updated, None));
        }
        self.db.flush()?;
        let seq = self.publish(ChangeKind::Put(Arc::new(updated.clone())));
        Ok((updated, Some(seq)))
    }

    /// Removes a sandbox and its host names.
    pub fn remove(&self, name: &str) -> Result<(Sandbox, u64)> {
        let _guard = self.lock();
        let removed = (&self.sandboxes, &self.hosts, &self.addresses)
            .transaction(|(sandboxes, hosts, addresses)| {
                let Some(old) = sandboxes.remove(name.as_bytes())? else {
                    return Err(abort(Error::NotFound(name.to_string())));
                };
                let old = decode_sandbox(name.as_bytes(), &old).map_err(abort)?;
                for host in old.hosts() {
                    hosts.remove(host.as_bytes())?;
                }
                if let Some(ip) = &old.assigned_ipv4 {
                    addresses.remove(ip.as_bytes())?;
                }
                Ok(old)
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        let seq = self.publish(ChangeKind::Removed(name.to_string()));
        Ok((removed, seq))
    }

    /// Gives sandbox `name` a fixed IPv4 address from `pool`, inside one
    /// write transaction with the address index: the one it has when that
    /// is still in the pool, else `pool.preferred` when free, else the
    /// first free address from `first + start_offset` on. Returns the
    /// record and the change's sequence number (the current one when
    /// nothing changed).
    pub fn assign_ipv4(&self, name: &str, pool: &AddressPool) -> Result<(Sandbox, u64)> {
        let _guard = self.lock();
        let outcome = (&self.sandboxes, &self.addresses)
            .transaction(|(sandboxes, addresses)| {
                let Some(old) = sandboxes.get(name.as_bytes())? else {
                    return Err(abort(Error::NotFound(name.to_string())));
                };
                let mut sb = decode_sandbox(name.as_bytes(), &old).map_err(abort)?;
                let current = sb
                    .assigned_ipv4
                    .as_deref()
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                if current.is_some_and(|ip| pool.contains(ip)) {
                    return Ok((sb, false));
                }
                let free = |ip: Ipv4Addr| -> std::result::Result<
                    bool,
                    sled::transaction::UnabortableTransactionError,
                > {
                    if !pool.contains(ip) {
                        return Ok(false);
                    }
                    Ok(match addresses.get(ip.to_string().as_bytes())? {
                        None => true,
                        Some(owner) => owner.as_ref() == name.as_bytes(),
                    })
                };
                let mut chosen = None;
                if let Some(p) = pool.preferred {
                    if free(p)? {
                        chosen = Some(p);
                    }
                }
                if chosen.is_none() {
                    let (first, last) = (u32::from(pool.first), u32::from(pool.last));
                    let span = u64::from(last.saturating_sub(first)) + 1;
                    let offset = u64::from(pool.start_offset) % span;
                    for i in 0..span {
                        let n = first as u64 + (offset + i) % span;
                        let ip = Ipv4Addr::from(n as u32);
                        if free(ip)? {
                            chosen = Some(ip);
                            break;
                        }
                    }
                }
                let Some(ip) = chosen else {
                    return Err(abort(Error::NoFreeAddress(pool.label.clone())));
                };
                if let Some(old_ip) = &sb.assigned_ipv4 {
                    addresses.remove(old_ip.as_bytes())?;
                }
                let text = ip.to_string();
                addresses.insert(text.as_bytes(), name.as_bytes())?;
                sb.assigned_ipv4 = Some(text);
                sb.updated_at = now();
                sandboxes.insert(name.as_bytes(), encode(&sb).map_err(abort)?)?;
                Ok((sb, true))
            })
            .map_err(tx_err)?;
        let (sb, changed) = outcome;
        if !changed {
            return Ok((sb, self.seq()));
        }
        self.db.flush()?;
        let seq = self.publish(ChangeKind::Put(Arc::new(sb.clone())));
        Ok((sb, seq))
    }

    /// The sandbox an address is assigned to.
    pub fn owner_of_address(&self, ip: &str) -> Result<Option<String>> {
        Ok(self
            .addresses
            .get(ip.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores an opaque record (certificates, ACME accounts, settings...).
    /// Records do not appear on the change feed.
    pub fn put_record(&self, collection: &str, key: &str, value: &serde_json::Value) -> Result<()> {
        let k = record_key(collection, key)?;
        let _guard = self.lock();
        self.records.insert(k, encode(value)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// Reads one opaque record.
    pub fn get_record(&self, collection: &str, key: &str) -> Result<Option<serde_json::Value>> {
        let k = record_key(collection, key)?;
        match self.records.get(&k)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    key: format!("{collection}/{key}"),
                    reason: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    /// Deletes one opaque record; true if it existed.
    pub fn delete_record(&self, collection: &str, key: &str) -> Result<bool> {
        let k = record_key(collection, key)?;
        let _guard = self.lock();
        let existed = self.records.remove(k)?.is_some();
        self.db.flush()?;
        Ok(existed)
    }

    /// All records of a collection, by key.
    pub fn list_records(&self, collection: &str) -> Result<Vec<(String, serde_json::Value)>> {
        let mut prefix = collection.as_bytes().to_vec();
        prefix.push(0);
        self.records
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, v) = item?;
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let value = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                    key: format!("{collection}/{key}"),
                    reason: e.to_string(),
                })?;
                Ok((key, value))
            })
            .collect()
    }

    /// Everything, as one document (contains secrets: private keys).
    pub fn export(&self) -> Result<Backup> {
        let _guard = self.lock();
        let mut records: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        for item in self.records.iter() {
            let (k, v) = item?;
            let Some(split) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let collection = String::from_utf8_lossy(&k[..split]).into_owned();
            let key = String::from_utf8_lossy(&k[split + 1..]).into_owned();
            let value = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                key: format!("{collection}/{key}"),
                reason: e.to_string(),
            })?;
            records.entry(collection).or_default().insert(key, value);
        }
        Ok(Backup {
            format: BACKUP_FORMAT.into(),
            schema_version: SCHEMA_VERSION,
            sandboxes: self.list()?,
            records,
        })
    }

    /// Checks a backup document completely without writing anything.
    pub fn check_backup(backup: &Backup) -> Result<()> {
        if backup.format != BACKUP_FORMAT {
            return Err(Error::BadBackup(format!(
                "format is {:?}, expected {BACKUP_FORMAT:?}",
                backup.format
            )));
        }
        if backup.schema_version > SCHEMA_VERSION {
            return Err(Error::BadBackup(format!(
                "schema {} is newer than this sandboxd ({SCHEMA_VERSION})",
                backup.schema_version
            )));
        }
        let mut names = HashSet::new();
        let mut hosts = HashSet::new();
        let mut ips = HashSet::new();
        for sb in &backup.sandboxes {
            sb.validate()
                .map_err(|e| Error::BadBackup(format!("sandbox {:?}: {e}", sb.name)))?;
            if !names.insert(sb.name.as_str()) {
                return Err(Error::BadBackup(format!(
                    "sandbox {} appears twice",
                    sb.name
                )));
            }
            for host in sb.hosts() {
                if !hosts.insert(host.clone()) {
                    return Err(Error::BadBackup(format!("host {host} appears twice")));
                }
            }
            if let Some(ip) = &sb.assigned_ipv4 {
                if !ips.insert(ip.clone()) {
                    return Err(Error::BadBackup(format!("address {ip} appears twice")));
                }
            }
        }
        for (collection, entries) in &backup.records {
            for key in entries.keys() {
                record_key(collection, key).map_err(|e| Error::BadBackup(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Replaces everything with `backup`, in one transaction. Refuses a
    /// store holding sandboxes unless `replace` is set. `progress` is called once per
    /// sandbox staged.
    pub fn import(
        &self,
        backup: &Backup,
        replace: bool,
        mut progress: impl FnMut(&Sandbox),
    ) -> Result<u64> {
        Self::check_backup(backup)?;
        let _guard = self.lock();
        // Records alone (an internal CA made at first start) do not count:
        // a fresh daemon has them, and the backup's replace them.
        if !replace && !self.sandboxes.is_empty() {
            return Err(Error::NotEmpty(self.sandboxes.len()));
        }
        let old_keys = |tree: &sled::Tree| -> Result<Vec<sled::IVec>> {
            tree.iter().keys().map(|k| k.map_err(Error::from)).collect()
        };
        let (old_sb, old_hosts, old_records, old_ips) = (
            old_keys(&self.sandboxes)?,
            old_keys(&self.hosts)?,
            old_keys(&self.records)?,
            old_keys(&self.addresses)?,
        );
        let mut staged_sb = Vec::with_capacity(backup.sandboxes.len());
        let mut staged_hosts = Vec::new();
        let mut staged_ips = Vec::new();
        for sb in &backup.sandboxes {
            staged_sb.push((sb.name.clone(), encode(sb)?));
            for host in sb.hosts() {
                staged_hosts.push((host, sb.name.clone()));
            }
            if let Some(ip) = &sb.assigned_ipv4 {
                staged_ips.push((ip.clone(), sb.name.clone()));
            }
            progress(sb);
        }
        let mut staged_records = Vec::new();
        for (collection, entries) in &backup.records {
            for (key, value) in entries {
                staged_records.push((record_key(collection, key)?, encode(value)?));
            }
        }
        (&self.sandboxes, &self.hosts, &self.records, &self.addresses)
            .transaction(|(sandboxes, hosts, records, addresses)| {
                for k in &old_sb {
                    sandboxes.remove(k)?;
                }
                for k in &old_ips {
                    addresses.remove(k)?;
                }
                for (ip, name) in &staged_ips {
                    addresses.insert(ip.as_bytes(), name.as_bytes())?;
                }
                for k in &old_hosts {
                    hosts.remove(k)?;
                }
                for k in &old_records {
                    records.remove(k)?;
                }
                for (name, bytes) in &staged_sb {
                    sandboxes.insert(name.as_bytes(), bytes.as_slice())?;
                }
                for (host, name) in &staged_hosts {
                    hosts.insert(host.as_bytes(), name.as_bytes())?;
                }
                for (k, v) in &staged_records {
                    records.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(self.publish(ChangeKind::Reset))
    }
}
