"""fiber-det's config keys, added to Detectron2's yacs config by :func:`add_fiber_config`.

Defaults reproduce the official FIBER-B fine-grained model (its yaml values, and the code's
defaults where the yaml is silent). Every key
below is read somewhere; Detectron2 keys that FIBER reuses are set in configs/Base-FIBER-SwinB.yaml
(MODEL.PIXEL_MEAN/STD, INPUT.*, MODEL.ANCHOR_GENERATOR.*, MODEL.FPN.OUT_CHANNELS,
MODEL.BACKBONE.FREEZE_AT, TEST.DETECTIONS_PER_IMAGE).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_fiber_config"]


def add_fiber_config(cfg: CN) -> CN:
    """Add the ``MODEL.FIBER`` node (in place) and return ``cfg``."""
    f = cfg.MODEL.FIBER = CN()

    # ---- image tower: Swin (presets in fiber_det.modeling.backbone.swin.SWIN_PRESETS) ----
    f.SWIN = CN()
    f.SWIN.EMBED_DIM = 128  # channels of stage 0; stage i has EMBED_DIM * 2**i
    f.SWIN.DEPTHS = [2, 2, 18, 2]  # blocks per stage
    f.SWIN.NUM_HEADS = [4, 8, 16, 32]  # attention heads per stage
    f.SWIN.WINDOW_SIZE = 12  # attention window (tokens per side)
    f.SWIN.SHIFT_SINGLE_WINDOW = True  # odd blocks shift even when the token map fits in one
    # window (Swin-Det, fine-grained); False: such a block runs unshifted (timm, coarse-grained)
    f.SWIN.MLP_RATIO = 4.0  # MLP hidden width / block width
    f.SWIN.PATCH_SIZE = 4  # patch embedding stride
    f.SWIN.DROP_PATH_RATE = 0.4  # drop-path rate of the last block (linear from 0)
    f.SWIN.USE_CHECKPOINT = False  # activation checkpointing of every Swin block in training
    f.SWIN.WEIGHTS = ""  # official Swin ImageNet checkpoint to initialise from ("" = none)

    # ---- text tower: BERT/RoBERTa architecture (a HF config.json maps 1:1 onto these) ----
    f.TEXT = CN()
    f.TEXT.ARCH = "roberta"  # "roberta" (positions from pad id + 1) or "bert" (0..T-1)
    f.TEXT.VOCAB_SIZE = 50265
    f.TEXT.HIDDEN_SIZE = 768
    f.TEXT.NUM_LAYERS = 12
    f.TEXT.NUM_HEADS = 12
    f.TEXT.INTERMEDIATE_SIZE = 3072  # FFN width
    f.TEXT.MAX_POSITIONS = 514  # rows of the position embedding
    f.TEXT.TYPE_VOCAB_SIZE = 1  # rows of the token-type embedding (only type 0 is used)
    f.TEXT.LAYER_NORM_EPS = 1e-5
    f.TEXT.PAD_TOKEN_ID = 1
    f.TEXT.DROPOUT = 0.1  # hidden dropout (embeddings, attention outputs, FFN output)
    f.TEXT.ATTENTION_DROPOUT = 0.1  # dropout on attention probabilities
    f.TEXT.USE_CHECKPOINT = False  # activation checkpointing of every text layer in training
    f.TEXT.FREEZE_WORD_EMBEDDINGS = False  # keep the word-embedding table fixed (official: trained;
    # freezing a pretrained table saves most of the optimizer's time on small CPU runs)
    f.TEXT.FREEZE_AT = 0  # 0: every text parameter trains (official); k >= 1 freezes the embeddings,
    # k >= 2 also text layers 0..k-2 (Detectron2's FREEZE_AT convention; frozen parts run in eval
    # mode, without dropout). NUM_LAYERS - FUSION.NUM_LAYERS + 1 freezes exactly the text prefix
    # (the layers before the first fused one): no backward and no optimizer work there
    f.TEXT.WEIGHTS = ""  # local HF BERT/RoBERTa folder to initialise the text tower ("" = none)
    f.TEXT.TOKENIZER = ""  # local folder of the (fast) tokenizer; required to run the model
    f.TEXT.MAX_QUERY_LEN = 256  # captions are truncated to this many tokens (incl. specials)
    f.TEXT.PAD_TO_MAX = True  # pad every caption to MAX_QUERY_LEN (official); False: to the
    # longest caption of the batch (faster; equal up to float round-off)

    # ---- attention kernels (Swin window attention, text self-attention, both cross-attentions) ----
    f.SDPA = True  # torch.nn.functional.scaled_dot_product_attention (fused kernels; equal up to
    # float rounding, ~1e-6; inference 1.1-1.9x faster on CPU, training as fast); False: the
    # upstream matmul / softmax sequence

    # ---- fusion ----
    f.FUSION = CN()
    f.FUSION.NUM_LAYERS = 6  # the last N Swin blocks pair with the last N text layers; 0 = no fusion
    f.FUSION.I2T_QUERY_NORM = False  # FIBER v3: LayerNorm on the image->text query (v2: False)

    # ---- FPN (channels: MODEL.FPN.OUT_CHANNELS) ----
    f.FPN = CN()
    f.FPN.DROP_BLOCK_PROB = 0.3  # DropBlock on the merged P3/P4 laterals in training (0 = off)
    f.FPN.DROP_BLOCK_SIZE = 3

    # ---- DyHead tower and region-word head ----
    f.HEAD = CN()
    f.HEAD.CHANNELS = 256  # tower width
    f.HEAD.NUM_CONVS = 6  # DyHead blocks
    f.HEAD.USE_DFCONV = True  # modulated deformable 3x3 convs (official); False: plain convs
    f.HEAD.GN_GROUPS = 16  # GroupNorm groups after each deformable conv (not Detectron2's 32)
    f.HEAD.PRIOR_PROB = 0.01  # initial token probability (sets bias0)
    f.HEAD.LOG_SCALE = 0.0  # initial log temperature of the region-word logits

    # ---- ATSS assignment, losses and inference ----
    f.ATSS = CN()
    f.ATSS.TOPK = 9  # candidate anchors per level and GT box (by centre distance)
    f.ATSS.REG_LOSS_WEIGHT = 2.0  # GIoU loss weight
    f.ATSS.TOKEN_ALPHA = 0.25  # focal loss alpha of the region-word loss
    f.ATSS.TOKEN_GAMMA = 2.0  # focal loss gamma
    f.ATSS.TOKEN_LOSS_WEIGHT = 1.0
    f.ATSS.INFERENCE_TH = 0.05  # phrase-score threshold before centerness (strict >)
    f.ATSS.PRE_NMS_TOP_N = 1000  # candidates kept per level and image
    f.ATSS.NMS_TH = 0.6  # class-aware NMS IoU ("+1" widths); detections per image:
    # TEST.DETECTIONS_PER_IMAGE

    _add_coarse_config(cfg)
    _add_data_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    return cfg


def _add_coarse_config(cfg: CN) -> None:
    """The coarse-grained image-text model (``MODEL.META_ARCHITECTURE: FiberCoarsePretrain``). It
    also reads MODEL.FIBER.{SWIN,TEXT,FUSION} (towers; TEXT.MAX_QUERY_LEN is the caption length),
    MODEL.PIXEL_MEAN/STD (RGB, in 0-1 units: ToTensor's /255 comes first) and MODEL.BACKBONE.FREEZE_AT."""
    c = cfg.MODEL.FIBER.COARSE = CN()
    c.IMAGE_SIZE = 384  # inputs are IMAGE_SIZE x IMAGE_SIZE; MODEL.FIBER.SWIN.WINDOW_SIZE must be IMAGE_SIZE / 32
    c.EMBED_DIM = 768  # width of the cross-modal projections, poolers and heads (official "hidden_size")
    c.ITC_ON = True  # image-text contrastive loss (queue, temperature)
    c.ITM_ON = True  # image-text matching; with ITC_ON training draws hard negatives from the ITC
    # scores (pre-training), without it random ones: each pair keeps its image or, for half of the
    # batch, takes a random training image (the official ITM retrieval fine-tuning)
    c.MLM_ON = True  # masked language modelling on the fused text
    c.QUEUE_SIZE = 4096  # ITC queue length (features, and for ITM the raw images, ids and masks)
    c.TEMPERATURE = 0.07  # initial ITC temperature (learned, clamped to [0.001, 1] before each use)
    c.MLM_PROBABILITY = 0.15  # fraction of non-special tokens selected for MLM (80 % <mask>, 10 % random)
    c.FUSED_OUTPUT_NORMS = False  # also apply the Swin final norm and the last text layer's output
    # LayerNorm on the fused (ITM/MLM) path; official: only the contrastive path applies them


def _add_data_config(cfg: CN) -> None:
    """Data keys: augmentation, dataset mixing, detection prompts."""
    cfg.INPUT.FLIP_PROB = 0.5  # horizontal flip probability in training (legacy "+1"; 0 for RefCOCO)
    cfg.DATASETS.COPY_FACTORS = []  # one int per DATASETS.TRAIN entry: times it is repeated ([] = 1s)
    p = cfg.DATASETS.PROMPT = CN()
    p.SEPARATOR = ". "  # between category names in a detection prompt (DATASETS.SEPARATION_TOKENS)
    p.SHUFFLE = True  # shuffle the all-categories training prompt per sample (not DISABLE_SHUFFLE)
    p.MAX_NEGATIVES = 85  # sampled negative names per sample, sampled-negatives path (RANDOM_SAMPLE_NEG)
    p.CONTROL_PROB = [0.0, 0.0, 1.0, 0.0]  # sampled-negatives path: P(one negative), P(no
    # negative), P(all MAX_NEGATIVES), P(drop positives; must be 0 as upstream asserts); the rest
    # of the mass draws a uniform count in 1..MAX_NEGATIVES (fiber_det.data.training_prompts)
    p.USE_CAPTION_PROMPT = False  # wrap names with the dataset's caption_prompt metadata (ODinW)
    cfg.INPUT.CAPTION_TRANSFORM = "albef"  # image-caption training transform (ImageCaptionMapper):
    # "albef" (square resize only: the official pre-training) or "albef_randaug" (random resized
    # crop, flip, RandomAugment: retrieval fine-tuning); at test time always "albef". The square
    # side is MODEL.FIBER.COARSE.IMAGE_SIZE


def _add_solver_config(cfg: CN) -> None:
    """Optimisation keys that Detectron2 lacks; BASE_LR, WEIGHT_DECAY, BIAS_LR_FACTOR,
    WEIGHT_DECAY_BIAS, WARMUP_*, GAMMA, MAX_ITER, CHECKPOINT_PERIOD, AMP.ENABLED and
    CLIP_GRADIENTS.* are Detectron2's own."""
    s = cfg.SOLVER
    s.LANG_LR = 1e-5  # learning rate of every parameter named "language_backbone" / text tower
    s.BACKBONE_BODY_LR_FACTOR = 1.0  # LR factor of the Swin body (not the text tower); also of
    # the coarse model's Swin (with its i2t modules), on top of SOLVER.COARSE's multipliers
    s.WEIGHT_DECAY_NORM_FACTOR = 1.0  # weight decay factor of parameters named "norm"/"Norm"
    s.STEP_FRACTIONS = []  # LR milestones as fractions of MAX_ITER (used when non-empty; else STEPS)
    s.MAX_EPOCH = 0  # > 0: MAX_ITER = MAX_EPOCH * len(train set) // IMS_PER_BATCH
    s.WEIGHT_DECAY_SCHEDULE = False  # multiply weight decay by GAMMA at milestone * RATIO
    s.WEIGHT_DECAY_SCHEDULE_RATIO = 0.667
    s.FUSED_OPTIMIZER = False  # AdamW's fused kernel (torch ``fused=True``): one pass per tensor instead
    # of one per arithmetic op (~3x faster steps on CPU), the same update up to float rounding;
    # False: the multi-tensor ("foreach") AdamW
    s.WARMUP_FRACTION = 0.0  # > 0: WARMUP_ITERS = int(MAX_ITER * WARMUP_FRACTION) (official coarse: 0.1)
    # SOLVER.LR_SCHEDULER_NAME (Detectron2's key): "WarmupMultiStepLR" (fine-grained: linear warmup
    # from WARMUP_FACTOR, x GAMMA at the milestones) or "WarmupLinearDecayLR" (coarse: linear warmup
    # from 0 over WARMUP_ITERS, then linear decay to 0 at MAX_ITER)
    s.ACCUMULATE_STEPS = 1  # micro-batches per optimizer step: each process runs IMS_PER_BATCH /
    # (processes * ACCUMULATE_STEPS) samples per forward, losses / ACCUMULATE_STEPS (the ITC queue
    # is updated after every micro-batch, as the official gradient accumulation does)
    a = s.ADAMW = CN()
    a.UPDATE = "torch"  # "torch": torch.optim.AdamW (fine-grained); "transformers": eps before the
    # bias correction, weight decay after the step (transformers' AdamW, the official coarse optimiser)
    a.BETAS = (0.9, 0.999)  # (beta1, beta2); official coarse: (0.9, 0.98)
    a.EPS = 1e-8
    c = s.COARSE = CN()  # learning-rate multipliers of the coarse model's parameter groups
    c.LR_MULT_CROSS_MODAL = 5.0  # names with "cross_modal", "i2t" or "t2i"
    c.LR_MULT_HEAD = 5.0  # the MLM / ITM heads (official pre-training and retrieval: 5)
    s.AMP.DTYPE = "float16"  # autocast dtype when AMP.ENABLED: "float16" (GradScaler) or "bfloat16"
    s.MAX_NEG_PER_BATCH = 0.1  # skip a batch if more than this fraction of its images has no box
    s.NONFINITE_PATIENCE = 5  # consecutive non-finite losses (steps skipped) before training stops
    e = cfg.MODEL.EMA = CN()
    e.ENABLED = False  # keep an exponential moving average of every state-dict entry
    e.DECAY = 0.999
    e.USE_FOR_EVAL = False  # evaluate (and export) the EMA weights instead of the raw ones


def _add_test_config(cfg: CN) -> None:
    """Evaluation keys."""
    t = cfg.TEST
    t.CHUNK_SIZE = 0  # categories per prompt at test time (LVIS: 40); 0 = one prompt, split
    # automatically only when it would exceed MODEL.FIBER.TEXT.MAX_QUERY_LEN tokens
    t.PROMPTS_PER_BATCH = 8  # (image, prompt) pairs per forward when inputs carry several prompts
    # (sequential path: at least the images of the batch)
    t.SHARED_PREFIX = True  # inference computes each image's Swin prefix (blocks before the first
    # fused one) once and each prompt's text prefix once (cached across images), then the fused
    # part per (image, prompt) pair; every image at its own padded size. False: every pair through
    # the whole network, a call's images padded to a common size (the parity path). Equal per image
    # up to float rounding (fiber_det/modeling/shared_prefix.py); faster with several prompts
    t.COCO_BOX_PLUS_ONE = True  # COCO results as xywh with w = x2 - x1 + 1 (official; paper numbers)
    t.LVIS_TOPK_PER_CATEGORY = 10000  # FixedAP: detections kept per category over the dataset
    r = t.RETRIEVAL = CN()  # image-text retrieval evaluation (evaluator_type "retrieval")
    r.ITM = ""  # "": ITC recall only; "exhaustive": also score every (image, caption) pair with the
    # ITM head (the official protocol); "topk": ITM on the ITC top-ITM_TOPK candidates only (faster,
    # not the official protocol; reported under "itm_top<k>_" keys)
    r.ITM_TOPK = 128  # candidates per query in the "topk" mode (>= 10)
    r.BATCH_SIZE = 64  # items per forward in retrieval evaluation (official: 64 captions)
