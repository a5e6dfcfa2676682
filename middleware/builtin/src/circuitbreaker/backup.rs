//! `backupService`: forwards a request the breaker rejected to backup backends.
//!
//! The backends get an ordinary endpoint client from the gateway's [`client::Factory`], so
//! every target form works (`host:port`, `http(s)://host:port`, `discovery:///name`), nodes
//! are balanced by the backup endpoint's `selector` and connection pools are shared with
//! the rest of the gateway. A failed backup call is an upstream error (the client gets 502).

use http::Request;
use tower::ServiceExt;

use super::ResponseFuture;
use middleware::{Body, RequestOptions};

/// The backup backends of one breaker.
#[derive(Clone)]
pub struct Backup {
    client: client::Client,
}

impl Backup {
    /// Builds the client of `endpoint`'s backends; `name` names it in logs and debug views.
    /// Errors are `(option field below options., message)`.
    pub fn new(
        clients: &client::Factory,
        name: &str,
        endpoint: &configs::Endpoint,
    ) -> Result<Self, (String, String)> {
        if endpoint.backends.is_empty() {
            return Err((
                "backupService.endpoint.backends[0]".into(),
                "no backends: list at least one `target`".into(),
            ));
        }
        let spec = client::ClientSpec {
            name,
            protocol: endpoint.protocol,
            selector: &endpoint.selector,
            backends: &endpoint.backends,
            tls_store: &Default::default(),
        };
        let client = clients
            .build(&spec)
            .map_err(|err| (error_field(&err, endpoint), err.to_string()))?;
        Ok(Self { client })
    }

    /// Sends `request` to a backup node; the future resolves to its response.
    pub fn forward(&self, mut request: Request<Body>) -> ResponseFuture {
        if let Some(options) = request.extensions_mut().get_mut::<RequestOptions>() {
            // Node filters and tried nodes are the primary endpoint's; they mean nothing here.
            options.filters.clear();
            options.tried.clear();
        }
        // Boxed here, not awaited in an async block: that trips rustc's higher-ranked
        // `Send` check on the client's `Service` impl.
        Box::pin(self.client.clone().oneshot(request))
    }

    /// Stops the client (unsubscribes its discovered services).
    pub fn close(&self) {
        self.client.close();
    }
}

/// The option field a client build error is about, e.g. `backupService.endpoint.backends[1]`.
fn error_field(error: &client::BuildError, endpoint: &configs::Endpoint) -> String {
    let backend = match error {
        client::BuildError::BadTarget { target, .. }
        | client::BuildError::NoDiscovery { target } => {
            endpoint.backends.iter().position(|b| b.target == *target)
        }
        client::BuildError::Tls { name, .. } => endpoint
            .backends
            .iter()
            .position(|b| b.tls_config_name == *name),
    };
    match (backend, error) {
        (Some(index), _) => format!("backupService.endpoint.backends[{index}]"),
        (None, client::BuildError::BadTarget { target, .. }) if *target == endpoint.selector => {
            "backupService.endpoint.selector".into()
        }
        (None, _) => "backupService.endpoint".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(targets: &[&str]) -> configs::Endpoint {
        configs::Endpoint {
            backends: targets
                .iter()
                .map(|target| configs::Backend {
                    target: (*target).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn field(endpoint: &configs::Endpoint) -> Option<String> {
        let clients = client::Factory::new(client::ClientOptions::default(), None);
        Backup::new(&clients, "backup", endpoint)
            .err()
            .map(|(field, _)| field)
    }

    #[tokio::test]
    async fn any_client_target_form_and_errors_name_the_field() {
        let direct = endpoint(&[
            "127.0.0.1:8001",
            "http://localhost:9/",
            "https://secure:443",
        ]);
        assert_eq!(field(&direct), None);
        assert_eq!(
            field(&endpoint(&[])).as_deref(),
            Some("backupService.endpoint.backends[0]")
        );
        // No registry configured: the discovery target is the one named.
        assert_eq!(
            field(&endpoint(&["127.0.0.1:1", "discovery:///svc"])).as_deref(),
            Some("backupService.endpoint.backends[1]")
        );
        assert_eq!(
            field(&endpoint(&["ftp://x:1"])).as_deref(),
            Some("backupService.endpoint.backends[0]")
        );
        let mut bad_selector = endpoint(&["127.0.0.1:1"]);
        bad_selector.selector = "fastest".into();
        assert_eq!(
            field(&bad_selector).as_deref(),
            Some("backupService.endpoint.selector")
        );
    }
}
