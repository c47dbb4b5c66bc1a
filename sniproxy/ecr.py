"""The ``[ecr]`` shorthand: the host names Amazon ECR uses in one region, as three routes."""

from __future__ import annotations

from .routes import Route

API, DKR, S3 = "ecr-api", "ecr-dkr", "ecr-s3"


def starport_bucket(region: str) -> str:
    """The AWS-owned bucket ECR serves image layers from, in every region."""
    return f"prod-{region}-starport-layer-bucket"


def al2023_repo_bucket(region: str) -> str:
    """The AWS-owned bucket Amazon Linux 2023's dnf reads its packages from, in each region.

    Not ECR's, but the same kind of fact: an S3 endpoint policy that allows only ECR's layers
    breaks dnf on the proxy's own instances. AWS names this bucket for S3 endpoint policies in
    the AL2023 user guide (Kernel Live Patching, "Policy requirements") and the EMR guide's
    "Sample policies for private subnets that access Amazon S3"."""
    return f"al2023-repos-{region}-de612dc2"


def dns_suffix(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def dualstack_suffixes(region: str) -> tuple[str, str]:
    """(api suffix, registry suffix) of ECR's dual-stack endpoints."""
    if region.startswith("cn-"):
        return "api.amazonwebservices.com.cn", "on.amazonwebservices.com.cn"
    return "api.aws", "on.aws"


def ecr_names(
    region: str, accounts: tuple[str, ...], fips: bool = False, dualstack: bool = False
) -> dict[str, list[str]]:
    """Route name -> host names, in a stable order."""
    sfx = dns_suffix(region)
    api = [f"api.ecr.{region}.{sfx}", f"ecr.{region}.{sfx}"]
    dkr = [f"{a}.dkr.ecr.{region}.{sfx}" for a in accounts]
    bucket = starport_bucket(region)
    s3 = [f"{bucket}.s3.{region}.{sfx}", f"{bucket}.s3.{sfx}"]
    if fips:
        api += [f"api.ecr-fips.{region}.{sfx}", f"ecr-fips.{region}.{sfx}"]
        dkr += [f"{a}.dkr.ecr-fips.{region}.{sfx}" for a in accounts]
    if dualstack:
        api_ds, dkr_ds = dualstack_suffixes(region)
        api.append(f"ecr.{region}.{api_ds}")
        dkr += [f"{a}.dkr-ecr.{region}.{dkr_ds}" for a in accounts]
        s3.append(f"{bucket}.s3.dualstack.{region}.{sfx}")
        if fips:  # the SDKs' names with both use_fips_endpoint and use_dualstack_endpoint
            api += [f"ecr-fips.{region}.{api_ds}", f"api.ecr-fips.{region}.{api_ds}"]
            dkr += [f"{a}.dkr-ecr-fips.{region}.{dkr_ds}" for a in accounts]
    return {API: api, DKR: dkr, S3: s3}


def ecr_routes(
    region: str,
    accounts: tuple[str, ...],
    fips: bool = False,
    dualstack: bool = False,
    port: int = 443,
    upstreams: dict[str, str] | None = None,
) -> list[Route]:
    """``upstreams`` maps "api"/"dkr"/"s3" to an override host, e.g. a vpce DNS name."""
    upstreams = upstreams or {}
    kinds = {API: "api", DKR: "dkr", S3: "s3"}
    return [
        Route(name=name, patterns=tuple(names), upstream=upstreams.get(kinds[name]), port=port)
        for name, names in ecr_names(region, accounts, fips, dualstack).items()
    ]
