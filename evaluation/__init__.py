"""phiforge.evaluation: RAG or fine-tuning, measured on the user's own questions (`phiforge evaluate`)."""
