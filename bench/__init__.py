"""phiforge.bench"""
