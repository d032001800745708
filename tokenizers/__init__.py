"""omnisky.tokenizers"""
