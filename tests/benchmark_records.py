"""Records of the four benchmarks as released, quoted from public repositories that show them.

Each constant says where it was quoted from. "Quoted" records are copied field for field; a
"derived" one is a quoted record moved into another released layout by the rule that layout
follows (said next to it), for the layouts no public repository quotes a full record of.
The test files lay these out the way each download does; synthetic clips stand in for the videos.
"""

# -- Video-MME ---------------------------------------------------------------------------------------
# Quoted: showlab/livecc README.md (commit 0ec8679), "VideoMME" section, the first line of
# videomme.jsonl, less the two fields livecc adds to it ("tos_key", "subtitles"). The columns are
# those of lmms-eval/Video-MME's videomme/test-*.parquet (its dataset card's features).
VIDEOMME_001_1 = {
    "video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
    "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
    "task_type": "Counting Problem",
    "question": "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles "
                "and berries, which kind of the decoration has the largest number?",
    "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
    "answer": "C",
}

# -- MVBench -----------------------------------------------------------------------------------------
# Quoted: json/action_antonym.json of OpenGVLab/MVBench (main revision), as a public repository's
# MVBench integration notes quote it (search "正确答案是候选项的文本"); the clip is video/ssv2_video/166583.webm.
MVBENCH_ANTONYM_MAIN = {
    "video": "166583.webm", "question": "What is the action performed by the person in the video?",
    "candidates": ["Not sure", "Scattering something down", "Piling something up"], "answer": "Piling something up",
}
# Quoted: the same question with the .mp4 clip name, as modelscope/evalscope's docs/en/benchmarks/mvbench.md
# ("Sample Example") quotes it: the name in ssv2_video_mp4/ of revision `video`, which lmms-eval reads.
MVBENCH_ANTONYM_VIDEO = dict(MVBENCH_ANTONYM_MAIN, video="166583.mp4")
# Derived: an Object Interaction question of revision `video` (lmms-eval's layout). Its clip path, question,
# options and answer are quoted from an lmms-eval MVBench prediction log in a public repository (search
# "star/Charades_segment/USNP1_1.2999999999999998_15.4.mp4"): data_path ".../MVBench/star/Charades_segment/
# USNP1_1.2999999999999998_15.4.mp4", "Which object was taken by the person?", (A) The clothes. (B) The pillow.
# (C) The shoe. (D) The phone/camera., answer (D). In the main revision the same question names
# USNP1.mp4 with its window as start/end (the windowed tasks' fields in the official notebook).
MVBENCH_INTERACTION_VIDEO = {
    "video": "USNP1_1.2999999999999998_15.4.mp4", "question": "Which object was taken by the person?",
    "candidates": ["The clothes.", "The pillow.", "The shoe.", "The phone/camera."], "answer": "The phone/camera.",
}
MVBENCH_INTERACTION_MAIN = dict(MVBENCH_INTERACTION_VIDEO, video="USNP1.mp4", start=1.2999999999999998, end=15.4)
# Clip names quoted from public sources, for the other renamed folders of revision `video` (the records'
# questions are stand-ins: no public repository quotes them whole):
# EvolvingLMMs-Lab/lmms-eval issue #403: "~/.cache/huggingface/mvbench_video/sta/sta_video_segment/NBMH9_21.4_37.6.mp4".
MVBENCH_LOCALIZATION_CLIP = "NBMH9_21.4_37.6.mp4"
# A TinyLLaVA-Video example script (search "S009C003P016R002A006_rgb.avi"): MVBench/video/nturgbd/
# S009C003P016R002A006_rgb.avi, "What is the action performed by the person in the video?" drop / sit down /
# pick up / squat down (its answer is not quoted: "pick up" here is a stand-in).
MVBENCH_POSE = {
    "video": "S009C003P016R002A006_rgb.avi", "question": "What is the action performed by the person in the video?",
    "candidates": ["drop", "sit down", "pick up", "squat down"], "answer": "pick up",
}

# -- MLVU --------------------------------------------------------------------------------------------
# Quoted: FlagOpen/FlagEmbedding MLVU/data/5_order.json (commit 71cbc1f), its first two records: the
# official annotation files (MLVU/json/5_order.json of MLVU/MVLU on Hugging Face).
MLVU_ORDER = [
    {"video": "order_126.mp4", "duration": 665.3399999999999,
     "question": "Arrange the following events from the video in the correct chronological order: (1)Woman tapes "
                 "her hands with white tape; (2)Woman starts boxing in the ring with a guy; (3)Woman does sit ups "
                 "on a towel on the beach; (4)Pictures of woman in her bikini are shown.",
     "candidates": ["2->1->3->4", "3->2->1->4", "4->3->2->1", "1->2->3->4"], "answer": "1->2->3->4",
     "question_type": "order"},
    {"video": "order_151.mp4", "duration": 7590.67,
     "question": "Arrange the following events from the video in the correct chronological order: (1)The woman "
                 "starts working on her nails using bottles from a box next to her; (2)The words \"Love Food & "
                 "Money with Angie Greenup\" appears on screen; (3)Her twitter handle and subscribe screen are shown "
                 "while she holds her dogs; (4)The woman speaks to the camera from her living room while her dogs "
                 "play fight behind her.",
     "candidates": ["2->4->1->3", "2->1->4->3", "4->2->1->3", "1->2->4->3"], "answer": "2->4->1->3",
     "question_type": "order"},
]
# Quoted: FlagOpen/FlagEmbedding MLVU/data/9_summary.json (commit 6a9ea9b), first record (an open-ended task).
MLVU_SUMMARY = {
    "video": "217.mp4", "duration": 480.0, "question": "Please summarize this video, including its main content.",
    "answer": "The video starts with waves lapping against the rocks, creating a spray. Then, a boat appears with "
              "two men on board, one with a hat and the other without. The man without a hat holds a camera, "
              "seemingly focusing on two whales. The hatless man changes into a diving suit and dives underwater for "
              "a closer shot of the whales. The video then uses animation techniques to help us understand more "
              "about the whales. The video switches between the characters and the whales, but primarily describes "
              "the human activity of filming the whales.",
    "question_type": "summary",
}
# Quoted: the official plotQA and findNeedle records as public MLVU notes quote them (search
# "movie101_66.mp4" "What color is the main male character in the video?" and "needle_32.mp4").
MLVU_PLOT = {
    "video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the video?",
    "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA",
}
MLVU_NEEDLE = {
    "video": "needle_32.mp4", "duration": 467.98, "question": "What does the hand coming out of the computer do?",
    "candidates": ["Delivers a product", "Shakes the woman's hand", "Takes the woman's credit card",
                   "Points at something on the screen"],
    "answer": "Delivers a product", "question_type": "findNeedle",
}


def mlvu_dev(record: dict, task_type: str, question_id: str) -> dict:
    """Derived: an official record as a row of sy1998/MLVU_dev (what lmms-eval's mlvu_dev reads). The row
    layout is quoted from an lmms-eval samples log of mlvu_dev in a public repository (search "Evaluate
    MLVU-style MCQ with three lenses"), whose doc is this needle_32 question: {"video_name": "...mp4",
    "duration": 467.98, "question": "What ...?\\n(A) ...\\n(B) ...\\n(C) ...\\n(D) ...\\n", "candidates":
    ["Delivers a product", ...], "answer": "A", "task_type": "needle", "question_id": "Q0"}."""
    letters = "ABCDEF"
    lines = "".join(f"({letters[i]}) {c}\n" for i, c in enumerate(record["candidates"]))
    return {"video_name": record["video"], "duration": record["duration"], "question": f"{record['question']}\n{lines}",
            "candidates": record["candidates"], "answer": letters[record["candidates"].index(record["answer"])],
            "task_type": task_type, "question_id": question_id}


# -- LongVideoBench ----------------------------------------------------------------------------------
# Quoted: the first record of lvb_val.json as a public LongVideoBench loader's docstring quotes it (search
# "question_wo_referring_query": "Which subtitles appear at the same time?"), field for field.
LVB_VAL_0 = {
    "video_id": "86CxyhFV9MI",
    "question": "In the video, which subtitles appear at the same time as the man with black hair, dressed in grey "
                "clothes with black sleeves, on stage?",
    "question_wo_referring_query": "Which subtitles appear at the same time?",
    "candidates": ["promisc has come to an end, in and run away countless times, i was just scared, i still",
                   "run away countless times, i was just scared, i still and front of our crown, like a world of souls,",
                   "promisc has come to an end, in and front of our crown, like a world of souls,",
                   "promisc has come to an end, in and captain of the godson, three three three three three three"],
    "correct_choice": 1, "position": [854, 948, 1373], "topic_category": "NP-News-Programs",
    "question_category": "TOS", "level": "L2-Relation", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
    "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 600, "starting_timestamp_for_subtitles": 0,
    "duration": 190.16, "view_count": 259852,
}


def lvb_parquet_row(record: dict) -> dict:
    """Derived: the record as a row of validation-00000-of-00001.parquet (what lmms-eval's longvideobench
    tasks read): the columns of the longvideobench/LongVideoBench-Meta dataset card's features (video_id,
    id, video_path, subtitle_path, correct_choice, question, option0..option4, duration, duration_group,
    question_category, topic_category, starting_timestamp_for_subtitles), unused options "N/A", as an
    lmms-eval samples log of longvideobench_val_v shows this very question (search "Evaluate LVB-style MCQ")."""
    options = record["candidates"] + ["N/A"] * (5 - len(record["candidates"]))
    row = {k: record[k] for k in ("video_id", "id", "video_path", "subtitle_path", "correct_choice", "question")}
    row.update({f"option{i}": o for i, o in enumerate(options)})
    row.update({k: record[k] for k in ("duration", "duration_group", "question_category", "topic_category")})
    row["starting_timestamp_for_subtitles"] = float(record["starting_timestamp_for_subtitles"])
    return row


def lvb_test(record: dict) -> dict:
    """Derived: a question as lvb_test_wo_gt.json has it: the record less `correct_choice`, which the test
    split withholds (LongVideoBench's own loader reads it with di.get("correct_choice", -1))."""
    return {k: v for k, v in record.items() if k != "correct_choice"}
