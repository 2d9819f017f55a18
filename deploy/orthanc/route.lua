-- Orthanc: route stable lumbar MR studies to musclenode (the modality "musclenode" in orthanc.json).
--
-- A study is sent once, when it first becomes stable: its MR series whose BodyPartExamined is a
-- lumbar one, or an ambiguous one with a lumbar study, series or protocol description, and that no
-- exclusion pattern matches. musclenode applies its own, finer rules (axial, Dixon, T1/T2) and
-- records why it took or skipped each series; this script only keeps other studies off it.
-- The results musclenode sends back make the study stable again: the user metadata
-- MuscleNodeRouted (declared in orthanc.json) keeps it from being sent a second time.

local MODALITY = "musclenode"

local LUMBAR_BODY_PARTS = {
  LSPINE = true, LUMBARSPINE = true, LUMBAR = true, LSSPINE = true, LUMBOSACRAL = true,
  LWS = true, ["L-SPINE"] = true, LSP = true,
}
local AMBIGUOUS_BODY_PARTS = {
  [""] = true, SPINE = true, TSPINE = true, TLSPINE = true, SSPINE = true, ABDOMEN = true,
  PELVIS = true, BACK = true, WHOLEBODY = true,
}
-- Lua patterns ("%-" is a literal hyphen), matched on lower-cased descriptions.
local LUMBAR_PATTERNS = { "lumb", "l%-spine", "l spine", "lspine", "lws", "lenden" }
local EXCLUDE_PATTERNS = { "cervic", "hws", "thorac", "bws", "brain", "head", "knee", "shoulder",
                           "localizer", "scout", "survey" }

local function Matches(text, patterns)
  text = string.lower(text or "")
  for _, pattern in ipairs(patterns) do
    if string.find(text, pattern) then
      return true
    end
  end
  return false
end

local function BodyPart(value)
  return string.upper(string.gsub(value or "", "%s", ""))
end

function IsLumbarSeries(studyTags, seriesTags)
  if (seriesTags["Modality"] or "") ~= "MR" then
    return false
  end
  local descriptions = table.concat({ studyTags["StudyDescription"] or "", seriesTags["SeriesDescription"] or "",
                                      seriesTags["ProtocolName"] or "" }, " ")
  if Matches(descriptions, EXCLUDE_PATTERNS) then
    return false
  end
  local part = BodyPart(seriesTags["BodyPartExamined"])
  if LUMBAR_BODY_PARTS[part] then
    return true
  end
  return AMBIGUOUS_BODY_PARTS[part] == true and Matches(descriptions, LUMBAR_PATTERNS)
end

function OnStableStudy(studyId, tags, metadata)
  if metadata ~= nil and metadata["MuscleNodeRouted"] ~= nil then
    return
  end
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))
  local selected = {}
  for _, s in ipairs(series) do
    if IsLumbarSeries(tags, s["MainDicomTags"]) then
      table.insert(selected, s["ID"])
    end
  end
  if #selected == 0 then
    return
  end
  print("musclenode: routing " .. #selected .. " lumbar MR series of study " .. studyId)
  RestApiPut("/studies/" .. studyId .. "/metadata/MuscleNodeRouted", "yes")
  RestApiPost("/modalities/" .. MODALITY .. "/store",
              DumpJson({ Resources = selected, Asynchronous = true, Permissive = true }, true))
end
