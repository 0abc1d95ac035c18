"""Rules that assign atlas labels to ROI groups and hemispheres.

The shipped group tables in ``qsmdask/data`` were generated with these rules and are
checked against them in the tests; the rules are kept so that a user-supplied atlas
with AAL- or Brainnetome-style names can be grouped the same way.

Group vocabulary (``ROI_GROUPS``): cortical lobes ``frontal``, ``temporal``,
``parietal``, ``occipital``, plus ``insula``, ``cingulum``, ``hippocampus``,
``amygdala``, deep grey matter ``caudate``, ``putamen``, ``pallidum``, ``accumbens``,
``thalamus``, and ``cerebellum``. Conventions where atlases differ: paracentral lobule
is frontal, parahippocampal and fusiform gyri are temporal (as in the Brainnetome
gyrus scheme, Fan et al. 2016), the vermis is cerebellum with hemisphere ``""``.
"""

from __future__ import annotations

import re

__all__ = ["ROI_GROUPS", "aal_group", "brainnetome_group"]

ROI_GROUPS = ("frontal", "temporal", "parietal", "occipital", "insula", "cingulum",
              "hippocampus", "amygdala", "caudate", "putamen", "pallidum", "accumbens",
              "thalamus", "cerebellum")

_AAL_PREFIX = [
    ("Precentral", "frontal"), ("Frontal_", "frontal"), ("Rolandic_Oper", "frontal"),
    ("Supp_Motor_Area", "frontal"), ("Olfactory", "frontal"), ("Rectus", "frontal"),
    ("Paracentral_Lobule", "frontal"), ("OFC", "frontal"),
    ("Insula", "insula"), ("Cingul", "cingulum"), ("ACC_", "cingulum"),
    ("Hippocampus", "hippocampus"), ("ParaHippocampal", "temporal"), ("Amygdala", "amygdala"),
    ("Calcarine", "occipital"), ("Cuneus", "occipital"), ("Lingual", "occipital"),
    ("Occipital_", "occipital"), ("Fusiform", "temporal"),
    ("Postcentral", "parietal"), ("Parietal_", "parietal"), ("SupraMarginal", "parietal"),
    ("Angular", "parietal"), ("Precuneus", "parietal"),
    ("Caudate", "caudate"), ("Putamen", "putamen"), ("Pallidum", "pallidum"),
    ("N_Acc", "accumbens"), ("Thal", "thalamus"),
    ("Heschl", "temporal"), ("Temporal_", "temporal"),
    ("Cerebel", "cerebellum"), ("Vermis", "cerebellum"),
]


def _hemisphere_from_suffix(name: str) -> str:
    if re.search(r"_L($|_)", name) or name.endswith("_L"):
        return "L"
    if re.search(r"_R($|_)", name) or name.endswith("_R"):
        return "R"
    return ""


def aal_group(name: str) -> tuple[str, str]:
    """ROI group and hemisphere of an AAL (or AAL3) label name.

    Parameters
    ----------
    name : str
        Label name as in ``AAL.txt`` (e.g. ``"Putamen_L"``, ``"Vermis_4_5"``).

    Returns
    -------
    (roi, hemisphere) : tuple of str
        ``roi`` is one of ``ROI_GROUPS`` or ``""`` when the label has no group;
        hemisphere is ``"L"``, ``"R"`` or ``""`` (midline, e.g. vermis).
    """
    roi = ""
    for prefix, group in _AAL_PREFIX:
        if name.startswith(prefix):
            roi = group
            break
    return roi, _hemisphere_from_suffix(name)


_BN_PREFIX = {
    "SFG": "frontal", "MFG": "frontal", "IFG": "frontal", "OrG": "frontal", "PrG": "frontal",
    "PCL": "frontal",
    "STG": "temporal", "MTG": "temporal", "ITG": "temporal", "FuG": "temporal", "PhG": "temporal",
    "pSTS": "temporal",
    "SPL": "parietal", "IPL": "parietal", "PCun": "parietal", "PoG": "parietal",
    "INS": "insula", "CG": "cingulum",
    "MVOcC": "occipital", "LOcC": "occipital", "Cun": "occipital", "OcG": "occipital",
    "sOcG": "occipital",
    "Amyg": "amygdala", "Hipp": "hippocampus", "Tha": "thalamus",
}
# Brainnetome striatum ("BG"/"Str") subregions by their short name in parentheses.
_BN_STRIATUM = {"vCa": "caudate", "dCa": "caudate", "GP": "pallidum", "NAC": "accumbens",
                "vmPu": "putamen", "dlPu": "putamen"}


def brainnetome_group(index: int, name: str) -> tuple[str, str]:
    """ROI group and hemisphere of a Brainnetome (BN_Atlas_274_noCb) label.

    Parameters
    ----------
    index : int
        Label value. For 1-246 odd is left and even is right (Fan et al. 2016).
    name : str
        Label name, e.g. ``"SFG_L_7_1 (8m)"``, ``"Str_R_6_6 (dlPu)"``, ``"Cb_Vermis_VI"``.

    Returns
    -------
    (roi, hemisphere) : tuple of str

    References
    ----------
    Fan L. et al., The Human Brainnetome Atlas: a new brain atlas based on connectional
    architecture. Cereb Cortex 2016;26:3508-3526.
    """
    prefix = name.split("_", 1)[0]
    if prefix == "Cb":
        part = name.split("_")[1] if "_" in name else ""
        hemi = {"Left": "L", "Right": "R"}.get(part, "")
        return "cerebellum", hemi
    if 1 <= index <= 246:
        hemi = "L" if index % 2 == 1 else "R"
    else:
        hemi = _hemisphere_from_suffix(name)
    if prefix in ("Str", "BG"):
        m = re.search(r"\(([^)]*)\)", name)
        return _BN_STRIATUM.get(m.group(1) if m else "", ""), hemi
    return _BN_PREFIX.get(prefix, ""), hemi
