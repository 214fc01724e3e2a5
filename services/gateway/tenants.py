"""TenantService: a tenant reads what the operator set for it (its limits)."""

from __future__ import annotations

import grpc
from weir.v1 import tenants_pb2, tenants_pb2_grpc

from libs.cassandra.tenants import TenantStore
from libs.errors import NotFound
from services.gateway.auth import current_tenant


class TenantHandler(tenants_pb2_grpc.TenantServiceServicer):
    def __init__(self, tenants: TenantStore) -> None:
        self._tenants = tenants

    def GetTenant(self, request: tenants_pb2.GetTenantRequest,
                  context: grpc.ServicerContext) -> tenants_pb2.Tenant:
        tenant = self._tenants.get_tenant(current_tenant.get())
        if tenant is None:  # its key outlived it
            raise NotFound("the tenant no longer exists", reason="TENANT_NOT_FOUND")
        return tenants_pb2.Tenant(tenant_id=tenant.tenant_id, display_name=tenant.display_name,
                                  rate_limits=tenant.rate_limits)
