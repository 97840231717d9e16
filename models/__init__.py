"""Kosmos-G model layer: plain PyTorch modules (no Ray, MLflow or storage imports here).

Modules (import them directly; this package imports nothing so that `import kosmos_g.models`
stays cheap):
  config       dataclass configs, `model_preset("tiny"|"paper")`, dict/JSON helpers
  prompt       `parse_prompt`, `InterleavedTokenizer` (encode/collate -> batch dict)
  tokenizers   SentencePiece (mistral-common's model) and CLIP BPE tokenizers
  images       CLIP and VAE preprocessing (PIL/numpy/torch)
  mllm         CLIP vision encoder, resampler, Magneto decoder
  aligner      AlignerNet (M and N)
  image_decoder frozen SD v1.5 U-Net, VAE, DDPM scheduler, CLIP text teacher
  kosmos_g     `KosmosG`: encode, empty_condition, lm/align/diffusion losses, set_stage
  generation   diffusers pipelines fed with Kosmos-G conditions, LoRA helper
  checkpoint   safetensors save/load of the trainable parts
  counts       parameter counts per component
"""
