"""uniret.embed"""
