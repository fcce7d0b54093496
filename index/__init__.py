"""uniret.index"""
