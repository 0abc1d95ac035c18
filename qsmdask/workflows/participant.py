"""One subject-session end to end, in stages that pass volumes through a zarr store.

Stages (each a plain function of serialisable arguments, so an orchestrator can run each
as a task on any worker):

1. :func:`ingest` -- read and validate the BIDS MEGRE (and T1w) files, write them to zarr;
2. :func:`reconstruct` -- mask, unwrapping, background removal, dipole inversion -> chi in zarr;
3. :func:`standardise_and_measure` -- registration to the template, atlas labels to native
   space, ROI statistics, chi in template space (and smoothed) -> zarr;
4. :func:`write_outputs` -- BIDS derivatives, ROI Parquet and the manifest via the one writer.

Any failure is raised as :class:`StageError` carrying the stage and the file involved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..config import PipelineConfig
from ..io import zarrstore
from ..io.bids import SubjectSession, load_megre
from ..io.derivatives import DerivativesWriter, bids_uri
from ..io.nifti import checked_geometry, load_nifti
from ..report.references import chain_method
from ..kernels import b0_direction_from_affine, voxel_size_from_affine
from ..registration.register import ITK_THREADS_VAR

# The stages run ANTs: one ITK thread per task (Dask provides the parallelism), so that a seeded
# registration is bit-identical across processes and reruns. It must be set before ANTs' first
# use in the process; a value set beforehand (environment, worker configuration) is kept.
os.environ.setdefault(ITK_THREADS_VAR, "1")

#: ROI-table columns of the acquisition entities (``""`` where the input has none).
ROI_ENTITY_COLUMNS = ("acq", "ce", "rec", "dir", "run")

__all__ = ["StageError", "error_file", "discard_work", "ROI_ENTITY_COLUMNS", "ingest", "reconstruct",
           "standardise_and_measure", "write_outputs", "write_partial_outputs", "AFTER_RECONSTRUCT",
           "process_subject_session", "run_subject_session", "STAGES", "TRANSIENT_ERROR_TYPES", "resume_key",
           "is_up_to_date", "failure_row", "estimate_task_memory_bytes", "estimate_subject_memory_bytes"]


class StageError(RuntimeError):
    """A subject-session failed in ``stage``; ``file`` names the input involved when known."""

    def __init__(self, key: str, stage: str, error: BaseException):
        self.key, self.stage = key, stage
        self.file = error_file(error)
        self.error_type = type(error).__name__
        self.message = str(error)
        self.trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        super().__init__(f"{key}: {stage} failed: {self.error_type}: {self.message}")

    def __reduce__(self):  # picklable across Dask workers
        return (_rebuild_stage_error, (self.key, self.stage, self.file, self.error_type,
                                       self.message, self.trace))


def error_file(error: BaseException) -> str:
    """The file an error names: ``InputError.path``, ``OSError.filename`` (e.g. the output a
    full disk could not take), else ``""``."""
    for attr in ("path", "filename"):
        v = getattr(error, attr, None)
        if v:
            return str(v)
    return ""


def _rebuild_stage_error(key, stage, file, error_type, message, trace):
    e = StageError.__new__(StageError)
    e.key, e.stage, e.file, e.error_type, e.message, e.trace = key, stage, file, error_type, message, trace
    RuntimeError.__init__(e, f"{key}: {stage} failed: {error_type}: {message}")
    return e


def failure_row(ss: SubjectSession, err: BaseException) -> dict:
    """A row of the failures table for a subject-session that raised ``err``."""
    if isinstance(err, StageError):
        stage, file, etype, msg = err.stage, err.file, err.error_type, err.message
    else:
        stage, file, etype, msg = "orchestration", error_file(err), type(err).__name__, str(err)
    return {"participant_id": ss.participant_id, "session_id": ss.session_id,
            "acquisition": ss.acquisition, "stage": stage, "file": str(file), "error_type": etype,
            "message": msg[:2000]}


class _stage:
    def __init__(self, key, name):
        self.key, self.name = key, name

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if ev is not None and not isinstance(ev, (StageError, KeyboardInterrupt, SystemExit)):
            raise StageError(self.key, self.name, ev) from ev
        return False


def resume_key(ss: SubjectSession, config: PipelineConfig, checksums=None, *, fingerprint: str | None = None) -> str:
    """Acquisition key + input checksum + configuration fingerprint + pipeline version.

    ``checksums``: an :class:`~qsmdask.io.bids.InputChecksums` cache, so unchanged inputs
    are not read again. ``fingerprint``: ``config.fingerprint()`` when already computed (a
    plan of 10,000 subject-sessions computes it once).
    """
    h = hashlib.sha256()
    h.update(ss.key.encode())
    h.update(ss.checksum(checksums).encode())
    h.update((fingerprint or config.fingerprint()).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def is_up_to_date(ss: SubjectSession, output_dir, config: PipelineConfig, key: str | None = None, *,
                  tables_url=None, writer: DerivativesWriter | None = None) -> bool:
    """True when this subject-session's outputs exist, are intact and match the resume key.

    The manifest must also list the ROI table where ``tables_url`` puts it now (a run with
    another tables location recomputes the subject-session). ``writer``: the
    ``DerivativesWriter(output_dir, tables_url=tables_url)`` to use (one for a whole plan).
    """
    writer = writer or DerivativesWriter(output_dir, tables_url=tables_url)
    manifest = writer.read_manifest(ss.subject, ss.session, **ss.entities)
    if not manifest or manifest.get("status") != "done":
        return False
    key = key or resume_key(ss, config)
    return (manifest.get("resume_key") == key
            and writer.manifest_lists(manifest, writer.roi_path(ss.subject, ss.session, **ss.entities))
            and writer.manifest_intact(manifest))


# --------------------------------------------------------------------------------------------
def ingest(ss: SubjectSession, paths: dict) -> dict:
    """Read, validate and copy the inputs into the subject-session's zarr group.

    ``paths`` comes from :func:`work_paths` (zarr group URL, transform folder, ROI temp file).
    """
    work_url = paths["work_url"]
    with _stage(ss.key, "ingest"):
        data = load_megre(ss)
        zarrstore.write_volume(work_url, "magnitude", data.magnitude, data.affine)
        zarrstore.write_volume(work_url, "phase_rad", data.phase_rad, data.affine)
        t1w = False
        if ss.t1w is not None:
            t1, t1_aff, _ = load_nifti(ss.t1w, ndim=3)
            t1_aff, t1_note = checked_geometry(t1_aff, ss.t1w)
            if t1_note:
                data.notes.append(t1_note)
            zarrstore.write_volume(work_url, "t1w", t1, t1_aff)
            t1w = True
        return {"key": ss.key, "work_url": work_url, "shape": list(data.magnitude.shape),
                "affine": data.affine.tolist(), "echo_times_s": data.echo_times_s.tolist(),
                "b0_tesla": float(data.b0_tesla), "notes": data.notes, "has_t1w": t1w,
                "transform_dir": paths["transform_dir"], "roi_tmp": paths["roi_tmp"]}


def reconstruct(meta: dict, config: PipelineConfig) -> dict:
    """QSM reconstruction of the ingested volumes; writes chi, masks and fields to zarr."""
    with _stage(meta["key"], "reconstruct"):
        from ..chain import reconstruct as run_chain

        url = meta["work_url"]
        mag, affine = zarrstore.read_volume(url, "magnitude", dtype=np.float32)
        phase, _ = zarrstore.read_volume(url, "phase_rad", dtype=np.float32)
        t0 = time.perf_counter()
        res = run_chain(mag, phase, np.asarray(meta["echo_times_s"]), voxel_size_from_affine(affine),
                        b0_dir=b0_direction_from_affine(affine), b0_tesla=meta["b0_tesla"],
                        config=config.chain_config())
        seconds = time.perf_counter() - t0
        for name in ("chi_ppm", "mask", "local_field_ppm", "field_ppm"):
            zarrstore.write_volume(url, name, getattr(res, name), affine)
        qc = {k: float(v) for k, v in (res.qc or {}).items()}
        qc["recon_seconds"] = seconds
        notes = list(meta.get("notes", []))
        if len(meta["echo_times_s"]) == 1:
            notes.append(SINGLE_ECHO_NOTE)
            logging.getLogger("qsmdask.workflows").warning("%s: %s", meta["key"], SINGLE_ECHO_NOTE)
        return {**meta, "qc": qc, "notes": notes, "b0_dir": b0_direction_from_affine(affine).tolist()}


# Single-echo data: the field is the spatially unwrapped phase / (2 pi gamma B0 TE); one echo
# cannot separate the receiver phase offset from the field by echo time. Its harmonic part goes
# with the background field and its transceive part (a constant Laplacian over the brain) is
# fitted and removed (ChainConfig.single_echo_offset_fit; docs/benchmarks.md, single-echo).
SINGLE_ECHO_NOTE = ("single echo: field = unwrapped phase / (2 pi gamma B0 TE); the receiver phase "
                    "offset cannot be separated from the field by echo time: its harmonic part is "
                    "removed with the background field and its transceive part (constant Laplacian "
                    "over the brain) by a fit, any other non-harmonic offset the coil combination "
                    "left stays in the map (2 or more echoes separate it)")


def _native_reference(config: PipelineConfig, sn, chi, mask, affine, labels, atlas, url, echo_times_s):
    """Reference region in native space and its median chi: (value_ppm, sidecar dict)."""
    from ..atlas import load_template_tissue
    from ..reference import (describe_reference, lateral_ventricle_prior, r2star_map,
                             reference_mask, reference_value)

    ref = config.reference
    prior = r2s = None
    if ref in ("csf", "white_matter"):
        prob, paff = load_template_tissue("csf" if ref == "csf" else "wm",
                                          config.template_resolution_mm)
        prior_tpl = lateral_ventricle_prior(prob, paff) if ref == "csf" else prob > 0.9
        prior = sn.labels_to_native(prior_tpl.astype(np.int32), paff, chi.shape, affine) > 0
    if ref == "csf" and len(echo_times_s) >= 2:
        mag4, _ = zarrstore.read_volume(url, "magnitude", dtype=np.float32)
        r2s = r2star_map(mag4, echo_times_s, mask)
        del mag4
    region, info = reference_mask(ref, mask=mask, voxel_size_mm=voxel_size_from_affine(affine),
                                  erode_mm=config.reference_erode_mm, prior=prior, labels=labels,
                                  label_table=atlas.table, r2star_hz=r2s)
    value = reference_value(chi, region)
    return value, {"Reference": ref,
                   "ReferenceDescription": describe_reference(ref, config.reference_erode_mm),
                   "ReferenceValue_ppm": value, "ReferenceVoxels": info["n_voxels"],
                   "ReferenceErosion_mm": float(config.reference_erode_mm),
                   "ReferenceR2starRefined": bool(info["r2star_refined"])}


def standardise_and_measure(meta: dict, config: PipelineConfig) -> dict:
    """Register to the template, bring atlas labels to native space, reference chi
    (``config.reference``), extract ROI statistics and the template-space maps.

    Every later output uses the referenced map ``chi_referenced_ppm`` (written as a new
    zarr volume, so a rerun of this task never references twice).
    """
    with _stage(meta["key"], "standardise"):
        from ..atlas import load_atlas, load_template
        from ..registration import standardise
        from ..roi import roi_statistics, smooth_gaussian

        url = meta["work_url"]
        chi, affine = zarrstore.read_volume(url, "chi_ppm", dtype=np.float32)
        mask = zarrstore.read_volume(url, "mask")[0].astype(bool)
        mag = zarrstore.read_volume(url, "magnitude", dtype=np.float32)[0][..., 0]
        tpl, tpl_aff = load_template(resolution_mm=config.template_resolution_mm)
        t1 = t1_aff = None
        if meta.get("has_t1w"):
            t1, t1_aff = zarrstore.read_volume(url, "t1w", dtype=np.float32)
        sn = standardise(mag, affine, t1w=t1, t1w_affine=t1_aff, template=tpl, template_affine=tpl_aff,
                         method=config.registration, magnitude_mask=mask, seed=config.registration_seed,
                         quick=config.registration_quick)
        transform_dir = Path(meta["transform_dir"])
        transform_files = [str(p) for p in sn.save(transform_dir)]

    with _stage(meta["key"], "roi"):
        atlas = load_atlas(config.atlas, labels_tsv=config.atlas_labels_tsv,
                           groups_tsv=config.atlas_groups_tsv)
        labels = sn.labels_to_native(atlas.labels, atlas.affine, chi.shape, affine)
        zarrstore.write_volume(url, "atlas_native", labels.astype(np.int32), affine)

    with _stage(meta["key"], "reference"):
        ref_ppm, ref_meta = _native_reference(config, sn, chi, mask, affine, labels, atlas, url,
                                              meta["echo_times_s"])
        chi = np.where(mask, chi - np.float32(ref_ppm), 0).astype(np.float32)
        zarrstore.write_volume(url, "chi_referenced_ppm", chi, affine)

    with _stage(meta["key"], "standardise"):
        chi_tpl, _ = sn.to_template(chi, interpolation="linear")
        mask_tpl, _ = sn.to_template(mask.astype(np.float32), interpolation="linear")
        zarrstore.write_volume(url, "chi_template_ppm", chi_tpl, tpl_aff)
        zarrstore.write_volume(url, "mask_template", mask_tpl > 0.5, tpl_aff)
        if config.smoothing_fwhm_mm > 0:
            sm = smooth_gaussian(chi_tpl, voxel_size_mm=voxel_size_from_affine(tpl_aff),
                                 fwhm_mm=config.smoothing_fwhm_mm, mask=mask_tpl > 0.5)
            zarrstore.write_volume(url, "chi_template_smooth_ppm", sm, tpl_aff)

    with _stage(meta["key"], "roi"):
        roi = roi_statistics(chi, labels, atlas.table, voxel_size_mm=voxel_size_from_affine(affine),
                             erode_mm=config.erode_mm, min_voxels=config.min_voxels, mask=mask,
                             atlas_name=atlas.name)
        roi["reference"] = config.reference
        roi["reference_ppm"] = ref_ppm
        roi_path = Path(meta["roi_tmp"])
        roi_path.parent.mkdir(parents=True, exist_ok=True)
        roi.to_parquet(roi_path, index=False)
        return {**meta, "roi_tmp": str(roi_path), "transform_files": transform_files,
                "itk_threads": os.environ.get(ITK_THREADS_VAR, "default"),
                "template_affine": np.asarray(tpl_aff).tolist(), "reference": ref_meta}


def write_outputs(ss: SubjectSession, meta: dict, output_dir, config: PipelineConfig, *,
                  resume: str | None = None, keep_work: bool = False, tables_url=None,
                  run_token: str | None = None) -> dict:
    """Write every derivative of the subject-session with the one writer, then its manifest.

    The manifest is written last, so a subject-session counts as done only when all its
    files are in place; the zarr work group is removed afterwards unless ``keep_work``.
    The ROI table goes to ``tables_url`` (path or fsspec URL; default ``output_dir``).
    ``run_token``: recorded in the manifest (``"run_token"``) so that a batch run again in the
    same flow run recognises what it finished (:mod:`qsmdask.orchestration.batching`).
    """
    with _stage(ss.key, "write"):
        cfg = config.to_dict()
        writer = DerivativesWriter(output_dir, tables_url=tables_url)
        ents = ss.entities  # acq, ce, rec, dir, run of the input: in every output name
        sub, ses = ss.subject, ss.session
        url = meta["work_url"]
        affine = np.asarray(meta["affine"])
        sources = [bids_uri(p) for e in ss.echoes for p in (e.magnitude, e.phase)]
        chain_meta = {**chain_method(cfg["chain"]), "Chain": cfg["chain"],
                      "EchoTimes": meta["echo_times_s"], "MagneticFieldStrength": meta["b0_tesla"],
                      "B0DirectionVoxel": meta["b0_dir"], "Notes": meta.get("notes", []),
                      **meta.get("reference", {})}
        files = []
        referenced = zarrstore.has_volume(url, "chi_referenced_ppm")
        chi, _ = zarrstore.read_volume(url, "chi_referenced_ppm" if referenced else "chi_ppm",
                                       dtype=np.float32)
        chi_path = writer.save_image(sub, ses, "Chimap", chi, affine, sources=sources,
                                     sidecar={**chain_meta, "Units": "ppm", "SkullStripped": True}, **ents)
        files.append(chi_path)
        mask, _ = zarrstore.read_volume(url, "mask")
        mask_path = writer.save_image(sub, ses, "mask", mask.astype(np.uint8), affine,
                                      desc="brain", sources=sources,
                                      sidecar={**chain_meta, "Type": "Brain"}, **ents)
        files.append(mask_path)
        # QSM fields in ppm: no BIDS suffix exists for them (listed in .bidsignore)
        for name, suffix in (("local_field_ppm", "localfield"), ("field_ppm", "totalfield")):
            arr, _ = zarrstore.read_volume(url, name, dtype=np.float32)
            files.append(writer.save_image(sub, ses, suffix, arr, affine, sources=sources,
                                           sidecar={**chain_meta, "Units": "ppm", "SkullStripped": True},
                                           **ents))
        tpl_aff = np.asarray(meta["template_affine"])
        space = "MNI152NLin2009aSym"
        reg_meta = {"Registration": config.registration + (" (quick)" if config.registration_quick else ""),
                    "RegistrationSeed": config.registration_seed,
                    "ITKThreads": meta.get("itk_threads", "default"),
                    "Template": "MNI152 (nilearn package data)",
                    "TemplateResolution_mm": config.template_resolution_mm,
                    "Transforms": [Path(p).name for p in meta.get("transform_files", [])],
                    **meta.get("reference", {})}
        chi_src = [writer.uri(chi_path)]
        arr, _ = zarrstore.read_volume(url, "chi_template_ppm", dtype=np.float32)
        files.append(writer.save_image(sub, ses, "Chimap", arr, tpl_aff, space=space, sources=chi_src,
                                       sidecar={**reg_meta, "Units": "ppm", "SkullStripped": True}, **ents))
        if zarrstore.has_volume(url, "chi_template_smooth_ppm"):
            arr, _ = zarrstore.read_volume(url, "chi_template_smooth_ppm", dtype=np.float32)
            files.append(writer.save_image(sub, ses, "Chimap", arr, tpl_aff, space=space,
                                           desc="smooth", sources=chi_src,
                                           sidecar={**reg_meta, "Units": "ppm", "SkullStripped": True,
                                                    "SmoothingFWHM_mm": config.smoothing_fwhm_mm}, **ents))
        arr, _ = zarrstore.read_volume(url, "mask_template")
        files.append(writer.save_image(sub, ses, "mask", arr.astype(np.uint8), tpl_aff,
                                       space=space, desc="brain", sources=[writer.uri(mask_path)],
                                       sidecar={**reg_meta, "Type": "Brain"}, **ents))
        labels, _ = zarrstore.read_volume(url, "atlas_native")
        files.append(writer.save_image(sub, ses, "dseg", labels.astype(np.int16), affine,
                                       desc=_atlas_desc(config.atlas), sources=sources,
                                       sidecar={"Atlas": config.atlas, **reg_meta}, **ents))
        files.append(_qc_figure(ss, writer, url, chi, mask.astype(bool), labels, affine))
        files += [Path(p) for p in meta.get("transform_files", [])]

        roi = pd.read_parquet(meta["roi_tmp"])
        for col in reversed(ROI_ENTITY_COLUMNS):  # after participant_id, session_id (below)
            roi.insert(0, col, ents.get(col, ""))
        roi.insert(0, "session_id", ss.session_id)
        roi.insert(0, "participant_id", ss.participant_id)
        if "measure" not in roi.columns:
            roi.insert(2 + len(ROI_ENTITY_COLUMNS), "measure", "chi")
        for k, v in meta.get("qc", {}).items():
            roi[f"qc_{k}"] = v
        files.append(writer.save_roi_table(sub, ses, roi, **ents))
        Path(meta["roi_tmp"]).unlink(missing_ok=True)
        manifest = writer.write_manifest(sub, ses, files, config=cfg,
                                         status={"status": "done", "resume_key": resume or "",
                                                 "key": ss.key, "qc": meta.get("qc", {}),
                                                 **({"run_token": run_token} if run_token else {})}, **ents)
        if not keep_work:
            zarrstore.remove_group(url)
        return {"participant_id": ss.participant_id, "session_id": ss.session_id,
                "acquisition": ss.acquisition, "key": ss.key,
                "manifest": str(manifest), "n_files": len(files), "qc": meta.get("qc", {})}


# stages after the reconstruction: when one of them fails, the native maps are still written
AFTER_RECONSTRUCT = ("standardise", "roi", "write")


def write_partial_outputs(ss: SubjectSession, meta: dict, output_dir, config: PipelineConfig, *,
                          failed_stage: str, message: str) -> dict:
    """Write what a failed subject-session finished: its native-space reconstruction.

    Called when a stage after :func:`reconstruct` failed (``meta`` is reconstruct's result):
    the native Chimap, brain mask and field maps are written with the one writer, each
    sidecar saying ``"Status": "partial"`` and the failed stage, and the manifest records
    ``status: failed`` with ``failed_stage``, so a rerun recomputes the subject-session
    (only ``status: done`` counts as up to date).  The zarr work group is kept.
    """
    with _stage(ss.key, "write_partial"):
        writer = DerivativesWriter(output_dir)
        ents = ss.entities
        sub, ses = ss.subject, ss.session
        url = meta["work_url"]
        affine = np.asarray(meta["affine"])
        sources = [bids_uri(p) for e in ss.echoes for p in (e.magnitude, e.phase)]
        cfg = config.to_dict()
        side = {**chain_method(cfg["chain"]), "Chain": cfg["chain"], "EchoTimes": meta["echo_times_s"],
                "MagneticFieldStrength": meta["b0_tesla"], "B0DirectionVoxel": meta.get("b0_dir"),
                "Notes": meta.get("notes", []), "Status": "partial",
                "FailedStage": failed_stage, "FailureMessage": message[:500]}
        files = []
        chi, _ = zarrstore.read_volume(url, "chi_ppm", dtype=np.float32)
        files.append(writer.save_image(sub, ses, "Chimap", chi, affine, sources=sources,
                                       sidecar={**side, "Units": "ppm", "SkullStripped": True}, **ents))
        mask, _ = zarrstore.read_volume(url, "mask")
        files.append(writer.save_image(sub, ses, "mask", mask.astype(np.uint8), affine, desc="brain",
                                       sources=sources, sidecar={**side, "Type": "Brain"}, **ents))
        for name, suffix in (("local_field_ppm", "localfield"), ("field_ppm", "totalfield")):
            arr, _ = zarrstore.read_volume(url, name, dtype=np.float32)
            files.append(writer.save_image(sub, ses, suffix, arr, affine, sources=sources,
                                           sidecar={**side, "Units": "ppm", "SkullStripped": True}, **ents))
        manifest = writer.write_manifest(sub, ses, files, config=cfg,
                                         status={"status": "failed", "failed_stage": failed_stage,
                                                 "message": message[:2000], "qc": meta.get("qc", {})},
                                         **ents)
        return {"participant_id": ss.participant_id, "session_id": ss.session_id,
                "manifest": str(manifest), "n_files": len(files), "failed_stage": failed_stage}


def _qc_figure(ss, writer, url, chi, mask, labels, affine) -> Path:
    """Orthogonal-slice QC figure (magnitude + mask, total and local field, chi + atlas)."""
    from ..report.qc import qc_figure

    mag, _ = zarrstore.read_volume(url, "magnitude", dtype=np.float32)
    field, _ = zarrstore.read_volume(url, "field_ppm", dtype=np.float32)
    local, _ = zarrstore.read_volume(url, "local_field_ppm", dtype=np.float32)
    png = qc_figure(mag[..., 0], mask, field, local, chi, voxel_size_mm=voxel_size_from_affine(affine),
                    labels=labels, title=ss.key, affine=affine)
    return writer.save_bytes(ss.subject, ss.session, "qc", png, ext=".png", desc="recon", **ss.entities)


def _atlas_desc(atlas: str) -> str:
    name = Path(atlas).name.split(".")[0]
    return "".join(ch for ch in name if ch.isalnum()) or "atlas"


# Peak memory of the heavy stages, measured with bench/memory.py (peak resident-set rise of a
# stage over its start; simulated heads with a T1w, 3 echoes; 2 cores, Python 3.11):
#   GRE grid 75x75x53 (3 mm) / 112x112x80 (2 mm) / 149x149x107 (1.5 mm), 2 mm template:
#   reconstruct  35 / 125 / 312 MiB   = 41 / 43 / 46 bytes per voxel x echo
#   standardise 402 / 402 / 462 MiB   = ~400 MiB (registration and template-space arrays)
#                                        + ~26 bytes per GRE voxel
#   1 mm template, 3 mm grid: standardise 704 MiB (the fixed part grows with the template)
RECON_BYTES_PER_VOXEL_ECHO = 48
STANDARDISE_BYTES_PER_VOXEL = 26
STANDARDISE_FIXED_BYTES = {2: 400 * 2**20, 1: 720 * 2**20}  # by template resolution (mm)
MEMORY_SAFETY_FACTOR = 1.5


def estimate_task_memory_bytes(shape, *, template_resolution_mm: int = 2,
                               safety_factor: float = MEMORY_SAFETY_FACTOR) -> int:
    """Estimated peak memory in bytes of one reconstruct or standardise task.

    Parameters
    ----------
    shape : sequence of int
        The GRE grid, ``(x, y, z)`` or ``(x, y, z, echoes)`` (from the NIfTI headers).
    template_resolution_mm : {1, 2}
        The configuration's template resolution (sets the registration's fixed part).
    safety_factor : float
        Multiplier on the measured model (allocator slack, other data sets, T1w size).

    Returns
    -------
    int
        ``safety_factor * max(48 B * voxels * echoes, fixed + 26 B * voxels)``: the larger of
        the reconstruct and standardise peaks measured by ``bench/memory.py``, with fixed =
        400 MiB for the 2 mm template (720 MiB for 1 mm). Monotone in every dimension.
    """
    dims = tuple(int(s) for s in shape)
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise ValueError(f"shape must be (x, y, z) or (x, y, z, echoes) with positive sizes, got {tuple(shape)}")
    if template_resolution_mm not in STANDARDISE_FIXED_BYTES:
        raise ValueError(f"template_resolution_mm must be 1 or 2, got {template_resolution_mm!r}")
    voxels = dims[0] * dims[1] * dims[2]
    echoes = dims[3] if len(dims) == 4 else 1
    recon = RECON_BYTES_PER_VOXEL_ECHO * voxels * echoes
    standardise = STANDARDISE_FIXED_BYTES[template_resolution_mm] + STANDARDISE_BYTES_PER_VOXEL * voxels
    return int(safety_factor * max(recon, standardise))


def estimate_subject_memory_bytes(ss: SubjectSession, *, template_resolution_mm: int = 2) -> int | None:
    """:func:`estimate_task_memory_bytes` for a subject-session, from its first magnitude's
    NIfTI header (nothing else is read); None when the header cannot be read."""
    import nibabel as nib

    try:
        shape = nib.load(str(ss.echoes[0].magnitude)).shape[:3]
    except Exception:  # noqa: BLE001 - ingest reports unreadable files with their name
        return None
    if len(shape) != 3:
        return None
    return estimate_task_memory_bytes((*shape, len(ss.echoes)), template_resolution_mm=template_resolution_mm)


def work_paths(ss: SubjectSession, output_dir, work_root: str | None = None) -> dict:
    """Where a subject-session's intermediate zarr group, transforms and ROI table live.

    ``work_root`` may be any fsspec URL for the zarr volumes (``file://``, ``memory://``,
    ``s3://``); by default ``OUTPUT_DIR/work``. Every path carries the acquisition key, so
    two runs of one subject-session never share a store.
    """
    root = Path(output_dir)
    zroot = (work_root.rstrip("/") if work_root else str(root / "work"))
    xfm = root / f"sub-{ss.subject}"
    if ss.session:
        xfm = xfm / f"ses-{ss.session}"
    xfm = xfm / "xfm"
    if ss.acquisition:
        xfm = xfm / ss.acquisition
    return {"work_url": f"{zroot}/{ss.key}.zarr", "transform_dir": str(xfm),
            "roi_tmp": str(root / "work" / f"{ss.key}_roi.parquet")}


def discard_work(paths: dict) -> None:
    """Remove a failed subject-session's zarr work group and temporary ROI table (they may
    fill the disk); errors while removing are ignored (nothing else depends on them)."""
    try:
        zarrstore.remove_group(paths["work_url"])
    except Exception:  # noqa: BLE001 - best effort: an unreachable store stays
        pass
    Path(paths["roi_tmp"]).unlink(missing_ok=True)


#: Error types of a stage that a retry may cure (IO, not bad data and not bugs).
TRANSIENT_ERROR_TYPES = ("OSError", "TimeoutError", "ConnectionError", "BlockingIOError")

#: The stages of one subject-session, in order (the names of their timings).
STAGES = ("ingest", "reconstruct", "standardise", "write")


def run_subject_session(ss: SubjectSession, paths: dict, output_dir, config: PipelineConfig, *,
                        resume: str | None = None, tables_url=None, keep_work: bool = False,
                        on_stage=None, write_retries: int = 0, retry_delay_s: float = 2.0,
                        log: logging.Logger | logging.LoggerAdapter | None = None,
                        run_token: str | None = None) -> dict:
    """All stages of one subject-session, one after the other in this process.

    This is what one orchestrator task runs (one Prefect task per subject-session: the
    stages are plain calls, their volumes pass through the zarr group of ``paths``).

    ``on_stage(stage, event, seconds)`` is called with ``event`` ``"start"`` (seconds None)
    and ``"done"`` (the stage's wall seconds) around every stage, for progress reports.
    ``write_retries``: attempts added to the write stage when it fails with a transient IO
    error (:data:`TRANSIENT_ERROR_TYPES`), ``retry_delay_s`` apart. ``run_token`` goes into
    the manifest (:func:`write_outputs`).

    When a stage after the reconstruction fails, the native-space maps are still written
    (:func:`write_partial_outputs`, manifest status ``failed``) before the :class:`StageError`
    is raised; the zarr work group is removed on any failure unless ``keep_work``.
    Returns :func:`write_outputs`' result with ``stage_seconds`` (stage -> wall seconds).
    """
    log = log or logging.getLogger("qsmdask.workflows")
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args, **kwargs):
        if on_stage is not None:
            on_stage(stage, "start", None)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[stage] = time.perf_counter() - t0
        if on_stage is not None:
            on_stage(stage, "done", seconds[stage])
        return out

    try:
        meta = timed("ingest", ingest, ss, paths)
        recon = timed("reconstruct", reconstruct, meta, config)
        try:
            meta = timed("standardise", standardise_and_measure, recon, config)
            for attempt in range(int(write_retries) + 1):
                try:
                    out = timed("write", write_outputs, ss, meta, output_dir, config, resume=resume,
                                tables_url=tables_url, keep_work=keep_work, run_token=run_token)
                    break
                except StageError as e:
                    if attempt == write_retries or e.error_type not in TRANSIENT_ERROR_TYPES:
                        raise
                    log.warning("%s: write failed (%s: %s), retry %d of %d in %.0f s", ss.key, e.error_type,
                                e.message, attempt + 1, write_retries, retry_delay_s)
                    time.sleep(retry_delay_s)
        except StageError as e:  # keep the finished reconstruction, then report the failure
            try:
                write_partial_outputs(ss, recon, output_dir, config, failed_stage=e.stage, message=e.message)
                log.warning("%s: native Chimap written (partial outputs, manifest status failed)", ss.key)
            except Exception as pe:  # noqa: BLE001 - the original failure is what the row reports
                log.error("%s: the partial outputs could not be written either: %s", ss.key, pe)
            raise
    except BaseException:
        if not keep_work:
            discard_work(paths)
        raise
    return {**out, "stage_seconds": seconds}


def process_subject_session(ss: SubjectSession, output_dir, config: PipelineConfig, *,
                            work_root: str | None = None, tables_url=None, keep_work: bool = False) -> dict:
    """Run all stages for one subject-session in this process (library use and tests)."""
    return run_subject_session(ss, work_paths(ss, output_dir, work_root), output_dir, config,
                               resume=resume_key(ss, config), tables_url=tables_url, keep_work=keep_work)
