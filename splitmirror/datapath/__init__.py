"""The data path: a storage system's volumes and pairs, and what moves their bytes.

``system`` holds the volumes, the pairs and fences of one storage system and
says who may write what; ``writes`` is the write pipeline every host write and
every replicated write goes through; ``copyengine`` moves the tracks of a
differential set (resync, either direction); ``local_channel`` is the mirror
channel of a local pair.  Pair commands are the pairs layer's, above.
"""
