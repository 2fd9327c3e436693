"""`python -m services.triton tokenizer|lam|dynamics --checkpoint DIR --model-name NAME ...`: one model service."""

from services.triton.serve import main

main()
