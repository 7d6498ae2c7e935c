//! The Service maps (see `podnet_common::service`): frontends, their
//! backend slots and the backend-ports bitmap. The agent's Services sync
//! is their only writer (`--services bpf`); the datapath only reads them.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapData};
use podnet_common::{Backend, BackendKey, ServiceEntry, ServiceKey, names};

use super::{Datapath, DatapathError, map_err, removed};
use crate::services::{BackendAddress, Frontend};

impl Datapath {
    fn services_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, ServiceKey, ServiceEntry>, DatapathError> {
        let name = names::MAP_SERVICES;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))
    }

    fn service_backends_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, BackendKey, Backend>, DatapathError> {
        let name = names::MAP_SERVICE_BACKENDS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))
    }

    fn service_ports_map(&mut self) -> Result<Array<&mut MapData, u64>, DatapathError> {
        let name = names::MAP_SERVICE_PORTS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        Array::try_from(map).map_err(map_err(name, "opening as array"))
    }

    /// Every frontend with its entry.
    pub fn service_frontends(&mut self) -> Result<BTreeMap<Frontend, ServiceEntry>, DatapathError> {
        self.services_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, value)| (Frontend::from_key(&key), value))
                    .map_err(map_err(names::MAP_SERVICES, "iterating"))
            })
            .collect()
    }

    /// The entry of `frontend`, if the map has one (a point lookup).
    pub fn service_frontend(
        &mut self,
        frontend: Frontend,
    ) -> Result<Option<ServiceEntry>, DatapathError> {
        match self.services_map()?.get(&frontend.key(), 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(
                names::MAP_SERVICES,
                format!("looking up {frontend}"),
            )(e)),
        }
    }

    /// Backend slot `slot` of frontend `id`, if written (a point lookup).
    pub fn service_backend(
        &mut self,
        id: u32,
        slot: u32,
    ) -> Result<Option<BackendAddress>, DatapathError> {
        match self.service_backends_map()?.get(&backend_key(id, slot), 0) {
            Ok(backend) => Ok(Some(BackendAddress::from_value(&backend))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(
                names::MAP_SERVICE_BACKENDS,
                format!("looking up slot {slot} of frontend {id}"),
            )(e)),
        }
    }

    /// Adds or replaces a frontend's entry.
    pub fn upsert_service_frontend(
        &mut self,
        frontend: Frontend,
        entry: ServiceEntry,
    ) -> Result<(), DatapathError> {
        self.services_map()?
            .insert(frontend.key(), entry, 0)
            .map_err(map_err(
                names::MAP_SERVICES,
                format!("inserting {frontend}"),
            ))
    }

    /// Removes a frontend's entry (no error when absent).
    pub fn remove_service_frontend(&mut self, frontend: Frontend) -> Result<(), DatapathError> {
        removed(self.services_map()?.remove(&frontend.key()))
            .map_err(map_err(names::MAP_SERVICES, format!("removing {frontend}")))
    }

    /// Every backend slot: (frontend id, slot) -> backend.
    pub fn service_backends(
        &mut self,
    ) -> Result<BTreeMap<(u32, u32), BackendAddress>, DatapathError> {
        self.service_backends_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, value)| {
                        ((key.service, key.slot), BackendAddress::from_value(&value))
                    })
                    .map_err(map_err(names::MAP_SERVICE_BACKENDS, "iterating"))
            })
            .collect()
    }

    /// Writes backend slot `slot` of frontend `id`.
    pub fn upsert_service_backend(
        &mut self,
        id: u32,
        slot: u32,
        backend: BackendAddress,
    ) -> Result<(), DatapathError> {
        self.service_backends_map()?
            .insert(backend_key(id, slot), backend.value(), 0)
            .map_err(map_err(
                names::MAP_SERVICE_BACKENDS,
                format!("inserting slot {slot} of frontend {id} ({backend})"),
            ))
    }

    /// Removes backend slot `slot` of frontend `id` (no error when absent).
    pub fn remove_service_backend(&mut self, id: u32, slot: u32) -> Result<(), DatapathError> {
        removed(self.service_backends_map()?.remove(&backend_key(id, slot))).map_err(map_err(
            names::MAP_SERVICE_BACKENDS,
            format!("removing slot {slot} of frontend {id}"),
        ))
    }

    /// The backend-ports bitmap, every word.
    pub fn service_port_words(&mut self) -> Result<Vec<u64>, DatapathError> {
        self.service_ports_map()?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::MAP_SERVICE_PORTS, "reading"))
    }

    /// Writes word `index` of the backend-ports bitmap.
    pub fn set_service_port_word(&mut self, index: u32, word: u64) -> Result<(), DatapathError> {
        self.service_ports_map()?
            .set(index, word, 0)
            .map_err(map_err(
                names::MAP_SERVICE_PORTS,
                format!("writing word {index}"),
            ))
    }
}

impl Datapath {
    /// Drops from the connection table every translated connection whose
    /// backend is one of `departed` ((frontend id, backend)): the
    /// client's entry to the frontend and the backend's reply entry.
    /// Walks the table (up to `MAX_TRACKED_CONNECTIONS` entries): called
    /// only when a UDP backend leaves a frontend. Returns the connections
    /// dropped.
    pub fn forget_translated_connections(
        &mut self,
        departed: &std::collections::BTreeSet<(u32, BackendAddress)>,
    ) -> Result<usize, DatapathError> {
        use podnet_common::{FlowKey, TrackedConnection, policy::CONN_NAT_DST};
        let name = names::MAP_CONNTRACK;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let mut table: HashMap<&mut MapData, FlowKey, TrackedConnection> =
            HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))?;
        let doomed: Vec<FlowKey> = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, conn)| {
                conn.nat == CONN_NAT_DST
                    && departed.contains(&(
                        conn.service,
                        BackendAddress::from_value(&podnet_common::Backend {
                            address: conn.nat_address,
                            port: conn.nat_port,
                            pad: 0,
                        }),
                    ))
            })
            .flat_map(|(key, conn)| {
                let reply = FlowKey::new(
                    conn.nat_address,
                    key.src,
                    conn.nat_port,
                    key.src_port,
                    key.proto,
                );
                [key, reply]
            })
            .collect();
        for key in &doomed {
            // Gone meanwhile (expired, evicted): nothing to drop.
            let _ = table.remove(key);
        }
        Ok(doomed.len() / 2)
    }
}

fn backend_key(id: u32, slot: u32) -> BackendKey {
    BackendKey { service: id, slot }
}
