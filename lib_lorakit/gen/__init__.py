"""Image generation shared by every evaluation feature: backends, run folders with manifests,
pre-flight and post-checks, and the LoRA strength grid."""
