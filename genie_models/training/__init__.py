"""Training recipes: the tokenizer first, then the latent action model and dynamics co-trained."""
