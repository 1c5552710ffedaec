"""The dependency floors in pyproject.toml are true: each is at least the release that introduced what the code
(or its configuration) relies on. The versions were found by running the suite against the floors (see the
comment in pyproject.toml); this test keeps a floor from falling below what the code needs, and fails if the code
stops using the API (so that the floor can be revisited)."""
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip('tomli')

REPO = Path(__file__).resolve().parent.parent
# (package, oldest release that works, file, what in it needs that release)
NEEDS = [
    ('torch', '2.5', 'xlabml/attention.py', 'enable_gqa'),  # F.scaled_dot_product_attention(enable_gqa=)
    ('datasets', '4.0', 'xlabml/datasets.py', 'datasets.List('),  # the List feature type
    # a streamed JSON source declares its features (its text column is checked at load) from 5.0
    ('datasets', '5.0', 'xlabml/sources.py', 'features = dataset.features'),
    ('torchdata', '0.9', 'xlabml/datamodules.py', 'StatefulDistributedSampler'),
    # LightningCLI calls _parse_ckpt_path (overridden for 'last' and missing files) from 2.5.5; linked
    # arguments reach the model's hparams from 2.5.2
    ('lightning', '2.5.5', 'xlabml/cli.py', 'def _parse_ckpt_path'),
    # an integer val_check_interval (with check_val_every_n_epoch: null) stays an integer when parsed from YAML
    # from 2.6 (the Trainer's annotation); 2.5 makes it 2000.0, which the Trainer then refuses
    ('lightning', '2.6', 'conf/xlab.yaml', 'val_check_interval: 2000'),
    # Lightning >= 2.5.2 passes applied_instantiation_links (jsonargparse 4.39); the RichProgressBar theme (a
    # dataclass argument of a callback in a list) parses from 4.44
    ('jsonargparse', '4.44', 'conf/extra/rich.yaml', 'RichProgressBar'),
]


def floors():
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    result = {}
    for line in project['dependencies']:
        requirement = Requirement(line)
        lower = [Version(s.version) for s in requirement.specifier if s.operator in ('>=', '==', '~=')]
        result[requirement.name] = max(lower) if lower else None
    return result


@pytest.mark.parametrize('package,needed,path,marker', NEEDS, ids=[f'{p}>={v}' for p, v, _, _ in NEEDS])
def test_dependency_floor_covers_what_the_code_uses(package, needed, path, marker):
    assert marker in (REPO / path).read_text(), f"{path} no longer uses {marker!r}: revisit the {package} floor"
    floor = floors()[package]
    assert floor is not None and floor >= Version(needed), f"{package}>={floor}, but {marker} needs {needed}"


def test_every_dependency_has_a_floor():
    assert all(floor is not None for floor in floors().values())
