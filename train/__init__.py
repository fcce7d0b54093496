"""uniret.train"""
