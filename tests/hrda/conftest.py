"""64 px fake source/target folders (one class per quadrant): HRDA's context crop must hold a
32 px detail crop and a MiT context pass of at least 32 px."""

import pytest


@pytest.fixture(scope="session")
def hrda_domains(tmp_path_factory, fake_domain):
    base = tmp_path_factory.mktemp("hrda_domains")
    return (fake_domain(base / "source", 0, 1, size=64, ignore_corner=False),
            fake_domain(base / "target", 90, 2, size=64, ignore_corner=False))
