# Baseline: MMDetection 3.3's gn+ws/mask-rcnn_r101_fpn_gn-ws-all_2x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), not in the paper (it reports R50 GN+WS and R101 GN); the GN+WS R101 twin completes the family.
# MMDetection 3.3 model zoo: box/mask AP 42.0/37.7 (2x).
# Schedule: 2x. MMDetection 3.3 ships GN+WS Mask R-CNN only as 2x (and 20-23-24e),
# so the twin keeps its 2x schedule. With weight standardization dL/dW has
# zero row means already; GC matters here through the weight decay inside P.
# Its GC twin is mask_rcnn_r101_gn_ws_gc.py.
# ('gn/../gn+ws': mmengine 0.10.7 rejects a '+' right after 'mmdet::'.)
_base_ = 'mmdet::gn/../gn+ws/mask-rcnn_r101_fpn_gn-ws-all_2x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
