"""Key custody: the key-encryption-key port and envelope encryption of wallet keys.

Only the signer process imports the implementations in this package; the API
process handles nothing but opaque ciphertext.
"""
