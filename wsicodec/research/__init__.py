"""Research tools: training and evaluation data, metrics, LPIPS, PatchGAN, embeddings, train, finetune, eval."""
