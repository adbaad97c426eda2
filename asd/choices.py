"""The values a config key may take, named once, with nothing heavier than Python to import.

The modules that act on a choice import its tuple from here, and so does the config schema
(`asd.config.nodes`). The schema therefore loads without torch or Lightning, and `train.py` checks
a config before they load: a bad value is reported in about 1 s instead of 12 (docs/architecture.md,
"A run is six stages").
"""

# -- pseudo-anomalies (asd.anomalies, asd.image_anomalies) -----------------------------------------

# fmt: off
KINDS: tuple[str, ...] = ("tone", "harmonics", "impulses", "band_noise", "gain_drift", "pitch_drift",
                          "modulation", "outlier", "tf_blobs", "tf_band", "tf_span", "eq", "hum")
# fmt: on
STEADY_KINDS = ("eq", "hum")  # the whole clip, changed the same way throughout
#: what a run draws unless `fusion.anomalies.kinds` says otherwise: the steady kinds are opt-in, as
#: they moved `final` only within noise (docs/results.md, "Steady pseudo-anomalies")
DEFAULT_KINDS = tuple(k for k in KINDS if k not in STEADY_KINDS)
IMAGE_KINDS: tuple[str, ...] = ("blobs", "scratch", "cutpaste", "noise", "outlier")

# -- members -------------------------------------------------------------------------------------

#: b3 (asd.branches.contrastive)
OBJECTIVES = ("supcon", "subcluster_adacos")
SPECTRA = ("logmel", "multires")
SELF_SUPERVISED = ("auto", "always", "never")
#: b4's noise schedule (asd.branches.diffusion)
SCHEDULES = ("cosine", "linear")
#: how b2, b6 and b7 score their reconstruction error (asd.branches.error_profile)
PROFILE_MODES = ("mse", "mahalanobis", "temporal")
#: b6 (asd.branches.reprojection)
STRATEGIES = ("perlin", "band", "both")
POOLS = ("mean", "max", "topk")
#: b7 (asd.branches.vae)
SKIPS = ("none", "add", "concat", "gated")
RECONS = ("mse", "fft", "logfft", "ssim", "hybrid")
#: the terms `recon="hybrid"` weighs with `recon_weights`
RECON_TERMS = ("mse", "fft", "logfft", "ssim")
FFT_NORMS = ("l1", "l2")

# -- data (asd.data.audio, asd.data.cache, asd.data.synthetic) ----------------------------------------

CROPS = ("start", "center")
PADS = ("wrap", "zero")
ON_BAD_FILE = ("error", "skip")
MODELS = ("rotor", "valve")

# -- fusion (asd.scoring, asd.fusion.select) --------------------------------------------------------

FUSIONS = ("zmean", "zmin", "zmax")
#: the member-weighted mean of the z-scores, its weights fitted without test labels (`fuse_weighted`)
WEIGHTED = "zweighted"
#: `fusion.weighted.rule`: how its weights are made (`asd.fusion.select.member_weights`)
WEIGHT_RULES = ("criterion", "discriminant")
#: `fusion.weighted.measure`: what each member's criterion is, for its zweighted weight. official: the
#: official-score rule (AUC and pAUC); auc: the AUC alone. With n normals in a section, the pAUC
#: (FPR <= 0.1) rests on the ceil(0.1 n) highest-scoring ones: on a 10-clip machine one clip decides it.
#: `auc` moved `final` only within noise on synthetic, first-shot and MIMII runs (docs/results.md,
#: "Steady pseudo-anomalies, an AUC-only criterion"), so `official` stays the default
CRITERION_MEASURES = ("official", "auc")
#: what `final=auto` may choose among (asd.fusion.select): the fused per-domain z-scores
FUSION_CANDIDATES = ("meta", "attention", WEIGHTED, *FUSIONS)
