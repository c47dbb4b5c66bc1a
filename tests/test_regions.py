"""Regions as the installed botocore knows them: known, new (named like one), or a typo."""

import pytest

from sniproxy.regions import judge, partitions


@pytest.mark.parametrize("region, level", [("us-east-1", None), ("cn-northwest-1", None), ("us-gov-west-1", None),
                                           ("eu-wst-2", "error"), ("xx-east-1", "error"), ("ap-southeest-1", "error"),
                                           ("ap-east-9", "warning"), ("us-gov-north-1", "warning"),
                                           ("cn-south-7", "warning")])
def test_regions(region, level):
    assert judge(region).level == level


def test_region_typo_suggests_the_nearest_regions():
    assert judge("us-esat-1").message.endswith("(did you mean us-east-1 or us-west-1?)")
    assert "did you mean" not in judge("xx-east-1").message


def test_the_partitions_sniproxy_serves_are_in_botocores_data():
    """[ecr] expands names for aws, aws-cn and aws-us-gov (sniproxy.ecr.dns_suffix)."""
    names = {p.name for p in partitions()}
    assert {"aws", "aws-cn", "aws-us-gov"} <= names
    assert not any(r.endswith("-global") for p in partitions() for r in p.regions)
