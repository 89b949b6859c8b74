"""Units of the ancillary variables: declared, compared and converted, never guessed.

Climate rasters come in their own units (WorldClim precipitation in mm, a station grid in
tenths of mm, temperatures in K), and the research code standardises the published
Andalusia-MSMTU table, whose precipitation and evapotranspiration are not in millimetres per
year (means of about 3,400 and 5,150). A model records the units of its statistics; data in
other units is converted when the two are commensurable (pint, with cf_xarray's registry for
CF strings such as ``mm year-1``) and refused by name when they are not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from msmtu_batch.runtime.errors import MsmtuError

# The units of the published Andalusia-MSMTU ancillary table (ancillary/topo_climatic.csv).
# Its precipitation and evapotranspiration are in a unit of its own: nothing converts to it.
MSMTU_TABLE_UNIT = "Andalusia-MSMTU table units"
MSMTU_TABLE_UNITS: dict[str, str] = {
    "longitude": "degrees_east",
    "latitude": "degrees_north",
    "altitude": "m",
    "slope": "degree",
    "precipitation": MSMTU_TABLE_UNIT,
    "evapotranspiration": MSMTU_TABLE_UNIT,
    "temperature_ave": "degC",
    "temperature_max": "degC",
    "temperature_min": "degC",
}


def _registry():
    from cf_xarray.units import units  # pint registry that reads CF/udunits strings

    return units


def check_known_unit(unit: str, what: str) -> None:
    """Refuse a unit string the CF/udunits registry does not read, naming ``what`` declared it."""
    try:
        _registry().Unit(unit)
    except Exception:  # pint raises several kinds (undefined unit, syntax)
        raise MsmtuError(f"{what}: {unit!r} is not a unit udunits/CF knows (e.g. 'mm year-1', 'degC', "
                         "'kg m-2 year-1')") from None


def linear_conversion(from_units: str, to_units: str) -> tuple[float, float] | None:
    """``(scale, offset)`` such that ``value_to = scale * value_from + offset``; None when the
    units cannot be converted into each other (or are not units pint knows)."""
    if from_units == to_units:
        return 1.0, 0.0
    registry = _registry()
    try:
        zero, one = (registry.Quantity(v, from_units).to(to_units).magnitude for v in (0.0, 1.0))
    except Exception:  # pint raises several kinds (undefined unit, dimensionality, syntax)
        return None
    return float(one - zero), float(zero)


def convert(values: np.ndarray, from_units: str, to_units: str, what: str) -> np.ndarray:
    """``values`` in ``from_units`` expressed in ``to_units``; ``what`` names them in the refusal."""
    conversion = linear_conversion(from_units, to_units)
    if conversion is None:
        raise MsmtuError(f"{what} is in {from_units!r}, which cannot be converted to {to_units!r}")
    scale, offset = conversion
    if (scale, offset) == (1.0, 0.0):
        return values
    return (values * np.float32(scale) + np.float32(offset)).astype(np.float32)


def conversions_to_model(names: Sequence[str], data_units: Mapping[str, str | None],
                         model_units: Mapping[str, str], source: str) -> tuple[tuple[float, float], ...]:
    """Per ancillary variable, how to bring the data's values into the units of the model's
    statistics; refuse by name a variable without units or in units that do not convert."""
    conversions = []
    for name in names:
        have, want = data_units.get(name), model_units[name]
        if not have:
            raise MsmtuError(f"{source}: variable '{name}' has no units attribute; the model's statistics are in "
                             f"{want!r}")
        conversion = linear_conversion(have, want)
        if conversion is None:
            raise MsmtuError(f"{source}: variable '{name}' is in {have!r} but the model's statistics are in "
                             f"{want!r}, which cannot be converted; {_how_to_fix(name, have, want)}")
        conversions.append(conversion)
    return tuple(conversions)


def _how_to_fix(name: str, have: str, want: str) -> str:
    if MSMTU_TABLE_UNIT in (have, want):  # the published table, read without declared units
        return (f"declare the units of the Andalusia-MSMTU table's '{name}' with --ancillary-units {name}=UNITS "
                "(train and evaluate; config key ancillary_units)")
    return f"give the data in {want!r} or train on data in its units"


def apply_conversions(values: np.ndarray, conversions: Sequence[tuple[float, float]]) -> np.ndarray:
    """``values`` (A, ...) with each variable's ``(scale, offset)`` applied (a copy only if needed)."""
    if all(c == (1.0, 0.0) for c in conversions):
        return values
    scale = np.array([c[0] for c in conversions], np.float32).reshape(-1, *([1] * (values.ndim - 1)))
    offset = np.array([c[1] for c in conversions], np.float32).reshape(scale.shape)
    return (values * scale + offset).astype(np.float32)
