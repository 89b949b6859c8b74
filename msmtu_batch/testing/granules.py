"""Granules written the way the producers write them, for tests, examples and benchmarks:
MOD09A1-shaped HDF4-EOS granules through the HDF-EOS2 library (:mod:`.hdfeos`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from msmtu_batch.inputs.layers import BAND_NAMES, REFLECTANCE_FILL
from msmtu_batch.inputs.modis import (
    COLLECTION,
    COMPOSITE_DAYS,
    DOY_LAYER,
    GRID_NAME,
    GRID_ORIGIN,
    HDF4_LOCK,
    PRODUCT,
    QA_FILL,
    QA_LAYER,
    QC_FILL,
    QC_LAYER,
    SPHERE_RADIUS,
    TILE_SIZE,
)


def tile_upper_left(h: int, v: int) -> tuple[float, float]:
    return GRID_ORIGIN[0] + h * TILE_SIZE, GRID_ORIGIN[1] - v * TILE_SIZE


def _odl_object(name: str, value: str) -> str:
    return f"    OBJECT = {name}\n      NUM_VAL = 1\n      VALUE = {value}\n    END_OBJECT = {name}"


def write_granule(path: str | Path, start: dt.date, tile: tuple[int, int], reflectance: np.ndarray,
                  state_qa: np.ndarray, day_of_year: np.ndarray, *, band_quality: np.ndarray | None = None,
                  product: str = PRODUCT, collection: int = COLLECTION, compress: bool = True,
                  chunks: tuple[int, int] | None = None) -> Path:
    """Write a MOD09A1 C6.1 granule as MODAPS does, through the HDF-EOS2 library
    (:mod:`msmtu_batch.inputs.hdfeos`): grid ``MOD_Grid_500m_Surface_Reflectance`` on tile
    ``(h, v)``'s corners, sinusoidal sphere, the product's fields, types, fill values and
    attributes, deflate compression, and the ECS metadata (``CoreMetadata.0``,
    ``ArchiveMetadata.0``; the library writes ``StructMetadata.0``). ``reflectance`` is
    (7, n, n) int16 (n = 2400 in the real product; any n sets the pixel size), ``state_qa``
    and ``band_quality`` (``sur_refl_qc_500m``, default 0: ideal quality) per pixel,
    ``day_of_year`` 1-366 (-1 or 65535 for fill). ``chunks`` (rows, columns) stores every field
    in HDF4 chunks (MODAPS stores them whole)."""
    from pyhdf.SD import SD, SDC

    from msmtu_batch.testing.hdfeos import NUMBER_TYPES, write_sinusoidal_grid

    rows, columns = state_qa.shape
    left, top = tile_upper_left(*tile)
    quality = np.zeros((rows, columns), np.uint32) if band_quality is None else np.asarray(band_quality, np.uint32)
    angle = np.full((rows, columns), 3000, np.int16)  # 30 degrees: the angles are carried, not used
    fields = [(band, np.asarray(reflectance[i], np.int16), REFLECTANCE_FILL) for i, band in enumerate(BAND_NAMES)]
    fields += [(QC_LAYER, quality, QC_FILL), ("sur_refl_szen", angle, 0), ("sur_refl_vzen", angle, 0),
               ("sur_refl_raz", angle, 0), (QA_LAYER, np.asarray(state_qa, np.uint16), QA_FILL),
               (DOY_LAYER, np.asarray(day_of_year).astype(np.uint16), 65535)]
    with HDF4_LOCK:
        write_sinusoidal_grid(path, GRID_NAME, (left, top), (left + TILE_SIZE, top - TILE_SIZE), SPHERE_RADIUS,
                              fields, deflate=1 if compress else None, tile=chunks)
        end = start + dt.timedelta(days=COMPOSITE_DAYS - 1)
        core = "\n".join([
            "GROUP = INVENTORYMETADATA", "  GROUPTYPE = MASTERGROUP", "  GROUP = COLLECTIONDESCRIPTIONCLASS",
            _odl_object("SHORTNAME", f'"{product}"'), _odl_object("VERSIONID", str(collection)),
            "  END_GROUP = COLLECTIONDESCRIPTIONCLASS", "  GROUP = RANGEDATETIME",
            _odl_object("RANGEBEGINNINGDATE", f'"{start}"'), _odl_object("RANGEENDINGDATE", f'"{end}"'),
            "  END_GROUP = RANGEDATETIME", "END_GROUP = INVENTORYMETADATA", "END", ""])
        archive = "\n".join([
            "GROUP = ARCHIVEDMETADATA", "  GROUPTYPE = MASTERGROUP", "  GROUP = BOUNDINGRECTANGLE",
            *(_odl_object(name, f"{value:.6f}") for name, value in zip(
                ("NORTHBOUNDINGCOORDINATE", "SOUTHBOUNDINGCOORDINATE", "EASTBOUNDINGCOORDINATE",
                 "WESTBOUNDINGCOORDINATE"), _tile_bounding_coordinates(left, top))),
            "  END_GROUP = BOUNDINGRECTANGLE", "END_GROUP = ARCHIVEDMETADATA", "END", ""])
        sd = SD(str(path), SDC.WRITE)
        try:
            sd.attr("CoreMetadata.0").set(SDC.CHAR, core)
            sd.attr("ArchiveMetadata.0").set(SDC.CHAR, archive)
            for name, values, _fill in fields:
                sds = sd.select(name)
                long_name, units, valid, scale = _FIELD_ATTRIBUTES.get(name, _reflectance_attributes(name))
                hdf_type = NUMBER_TYPES[values.dtype]  # HDF4's number types, as pyhdf's SDC names them
                sds.attr("long_name").set(SDC.CHAR, long_name)
                sds.attr("units").set(SDC.CHAR, units)
                sds.attr("valid_range").set(hdf_type, list(valid))
                if scale is not None:
                    sds.attr("scale_factor").set(SDC.FLOAT64, scale)
                    sds.attr("add_offset").set(SDC.FLOAT64, 0.0)
                sds.endaccess()
        finally:
            sd.end()
    return Path(path)


def _tile_bounding_coordinates(left: float, top: float) -> tuple[float, float, float, float]:
    """North, south, east, west of a sinusoidal tile, in degrees (the widest parallel)."""
    north, south = np.degrees(top / SPHERE_RADIUS), np.degrees((top - TILE_SIZE) / SPHERE_RADIUS)
    widest = np.cos(np.radians(min(abs(north), abs(south)))) * SPHERE_RADIUS
    return north, south, np.degrees((left + TILE_SIZE) / widest), np.degrees(left / widest)


def _reflectance_attributes(name: str) -> tuple[str, str, tuple[int, int], float]:
    return f"Surface_reflectance_for_band_{name[-1]}", "reflectance", (-100, 16000), 0.0001


_FIELD_ATTRIBUTES: dict[str, tuple[str, str, tuple[int, int], float | None]] = {
    "sur_refl_qc_500m": ("500m Reflectance Band Quality", "bit field", (0, 4294966531), None),
    "sur_refl_szen": ("MODIS Band Solar Zenith Angle", "degree", (0, 18000), 0.01),
    "sur_refl_vzen": ("MODIS Band View Zenith Angle", "degree", (0, 18000), 0.01),
    "sur_refl_raz": ("MODIS Band Relative Azimuth Angle", "degree", (-18000, 18000), 0.01),
    "sur_refl_state_500m": ("500m State Flags", "bit field", (0, 57343), None),
    "sur_refl_day_of_year": ("Julian Day", "Julian day", (1, 366), None),
}


# --- VIIRS VNP09A1 / VJ109A1: HDF-EOS5 ------------------------------------------------------

VIIRS_M_BANDS = ("M1", "M2", "M3", "M4", "M5", "M7", "M8", "M10", "M11")  # the product's nine reflectance bands
VIIRS_GRID = "VNP_Grid_1km_2D"
VIIRS_TILE_PIXELS = 1200  # 1 km product: 1200 x 1200 pixels of 926.625 m per tile


def _viirs_struct_metadata(rows: int, columns: int, left: float, top: float, fields: list[tuple[str, str]]) -> str:
    """StructMetadata.0 of an HDF-EOS5 sinusoidal grid, as the HDF-EOS5 library writes it."""
    objects = "\n".join(
        f"\t\t\tOBJECT=DataField_{i}\n\t\t\t\tDataFieldName=\"{name}\"\n\t\t\t\tDataType={hdf_type}\n"
        f"\t\t\t\tDimList=(\"YDim\",\"XDim\")\n\t\t\t\tMaxdimList=(\"YDim\",\"XDim\")\n\t\t\tEND_OBJECT=DataField_{i}"
        for i, (name, hdf_type) in enumerate(fields, start=1))
    return (
        "GROUP=SwathStructure\nEND_GROUP=SwathStructure\nGROUP=GridStructure\n\tGROUP=GRID_1\n"
        f"\t\tGridName=\"{VIIRS_GRID}\"\n\t\tXDim={columns}\n\t\tYDim={rows}\n"
        f"\t\tUpperLeftPointMtrs=({left:.6f},{top:.6f})\n"
        f"\t\tLowerRightMtrs=({left + TILE_SIZE:.6f},{top - TILE_SIZE:.6f})\n"
        "\t\tProjection=HE5_GCTP_SNSOID\n"
        f"\t\tProjParams=({SPHERE_RADIUS:.6f},0,0,0,0,0,0,0,0,0,0,0,0)\n\t\tSphereCode=-1\n"
        "\t\tGridOrigin=HE5_HDFE_GD_UL\n"
        "\t\tGROUP=Dimension\n\t\tEND_GROUP=Dimension\n\t\tGROUP=DataField\n"
        f"{objects}\n\t\tEND_GROUP=DataField\n\t\tGROUP=MergedFields\n\t\tEND_GROUP=MergedFields\n"
        "\tEND_GROUP=GRID_1\nEND_GROUP=GridStructure\nGROUP=PointStructure\nEND_GROUP=PointStructure\n"
        "GROUP=ZaStructure\nEND_GROUP=ZaStructure\nEND\n")


def write_viirs_granule(path: str | Path, start: dt.date, tile: tuple[int, int], m_bands: dict[str, np.ndarray],
                        state_qa: np.ndarray, day_of_year: np.ndarray, *, product: str = "VNP09A1",
                        version: str = "002") -> Path:
    """Write a VNP09A1 (or VJ109A1) granule in the product's HDF-EOS5 layout, with h5py:
    ``/HDFEOS/GRIDS/VNP_Grid_1km_2D/Data Fields`` holding the nine reflectance bands
    ``SurfReflect_M1`` .. ``SurfReflect_M11`` (int16, fill -28672, valid -100..16000, scale
    0.0001), ``SurfReflect_Day_Of_Year`` (uint16, fill 65535), ``SurfReflect_QC`` (uint32),
    ``SurfReflect_State`` (uint16 StateQA, fill 65535) and the three angles; the grid's
    ``StructMetadata.0`` under ``/HDFEOS INFORMATION``; the granule's facts (ShortName,
    RangeBeginningDate, RangeEndingDate, tile numbers) as attributes of
    ``/HDFEOS/ADDITIONAL/FILE_ATTRIBUTES`` (docs/sensors.md). ``m_bands`` maps band names
    (M5, ...) to (n, n) int16 values; bands not given are fill. Any n sets the pixel size
    (1200 in the product)."""
    import h5py

    rows, columns = state_qa.shape
    left, top = tile_upper_left(*tile)
    angle = np.full((rows, columns), 3000, np.int16)
    fill = np.full((rows, columns), REFLECTANCE_FILL, np.int16)
    fields = [(f"SurfReflect_{b}", np.asarray(m_bands.get(b, fill), np.int16), REFLECTANCE_FILL, "reflectance",
               (-100, 16000), 0.0001, f"1km Surface Reflectance Band {b}") for b in VIIRS_M_BANDS]
    fields += [
        ("SurfReflect_Day_Of_Year", np.asarray(day_of_year).astype(np.uint16), 65535, "Julian day", (1, 366), None,
         "Surface Reflectance Day of Year"),
        ("SurfReflect_QC", np.zeros((rows, columns), np.uint32), 4294967295, "bit field", (0, 4294966531), None,
         "Surface Reflectance Band Quality"),
        ("SurfReflect_State", np.asarray(state_qa, np.uint16), 65535, "bit field", (0, 65534), None,
         "Surface Reflectance State QA"),
        ("SensorZenith", angle, -32767, "degree", (0, 18000), 0.01, "Sensor zenith"),
        ("SolarZenith", angle, -32767, "degree", (0, 18000), 0.01, "Solar zenith"),
        ("RelativeAzimuth", angle, -32767, "degree", (-18000, 18000), 0.01, "Relative azimuth"),
    ]
    hdf_types = {np.dtype(np.int16): "H5T_NATIVE_SHORT", np.dtype(np.uint16): "H5T_NATIVE_USHORT",
                 np.dtype(np.uint32): "H5T_NATIVE_UINT"}
    end = start + dt.timedelta(days=COMPOSITE_DAYS - 1)
    with h5py.File(path, "w") as f:
        grid = f.create_group(f"HDFEOS/GRIDS/{VIIRS_GRID}")
        data = grid.create_group("Data Fields")
        for name, values, fill_value, units, valid, scale, long_name in fields:
            dataset = data.create_dataset(name, data=values, chunks=(min(rows, 240), min(columns, 240)),
                                          compression="gzip", compression_opts=4, fillvalue=values.dtype.type(
                                              fill_value))
            dataset.attrs["_FillValue"] = np.array([fill_value], values.dtype)
            dataset.attrs["long_name"] = np.bytes_(long_name)
            dataset.attrs["units"] = np.bytes_(units)
            dataset.attrs["valid_range"] = np.array(valid, values.dtype)
            if scale is not None:
                dataset.attrs["scale_factor"] = np.array([scale], np.float64)
                dataset.attrs["add_offset"] = np.array([0.0], np.float64)
        info = f.create_group("HDFEOS INFORMATION")
        info.attrs["HDFEOSVersion"] = np.bytes_("HDFEOS_5.1.16")
        struct = _viirs_struct_metadata(rows, columns, left, top,
                                        [(name, hdf_types[values.dtype]) for name, values, *_ in fields])
        info.create_dataset("StructMetadata.0", data=np.bytes_(struct))
        facts = f.create_group("HDFEOS/ADDITIONAL/FILE_ATTRIBUTES")
        for key, value in {"ShortName": product, "VersionID": version, "RangeBeginningDate": str(start),
                           "RangeEndingDate": str(end), "HorizontalTileNumber": str(tile[0]),
                           "VerticalTileNumber": str(tile[1]),
                           "LongName": "VIIRS Surface Reflectance 8-Day L3 Global 1km SIN Grid"}.items():
            facts.attrs[key] = np.bytes_(value)
    return Path(path)
