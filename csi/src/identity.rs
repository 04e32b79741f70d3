//! Identity: who the plugin is, what it offers, whether it is ready.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use crate::pb::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::{Driver, DRIVER_NAME};

#[tonic::async_trait]
impl Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: self.version.into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// The backend decides (the daemon: once it is a cluster member);
    /// `ready: false` is what the liveness-probe sidecar reports as
    /// unhealthy.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.call(|b| Ok(b.ready())).await?;
        if let Err(why) = &ready {
            tracing::debug!(reason = %why, "CSI probe: not ready");
        }
        Ok(Response::new(ProbeResponse {
            ready: Some(ready.is_ok()),
        }))
    }
}
