"""omnisky.train"""
