//! Consul discovery. Work in progress.

use crate::{Discovery, Error, ServiceInstance, Watcher};

/// Discovery over a Consul agent's HTTP API.
pub struct ConsulDiscovery {
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
}

impl ConsulDiscovery {
    /// A discovery over the agent at `addr` (`host:port`); connects on first use.
    pub fn new(addr: String, token: Option<String>, datacenter: Option<String>) -> Self {
        Self {
            address: addr,
            token,
            datacenter,
        }
    }
}

#[async_trait::async_trait]
impl Discovery for ConsulDiscovery {
    async fn get_service(&self, _name: &str) -> Result<Vec<ServiceInstance>, Error> {
        let _ = &self.token;
        Err(Error::Stopped)
    }
    async fn watch(&self, _name: &str) -> Result<Box<dyn Watcher>, Error> {
        Err(Error::Stopped)
    }
    fn describe(&self) -> String {
        match &self.datacenter {
            Some(datacenter) => format!("consul://{}?datacenter={datacenter}", self.address),
            None => format!("consul://{}", self.address),
        }
    }
}
