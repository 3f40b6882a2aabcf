"""phiforge.retrieval"""
